//! The compatibility check before a move: what the source knows (its settings, the VM) and
//! what only the destination can say (its settings, CPU, memory, bridges, disks, versions and
//! a migration network both share). A failed check names each problem and its fix, and moves
//! nothing.

use std::sync::Arc;

use ferry_api::host::{
    CheckItem, CheckReport, DiskTargetSpec, IncomingCheck, IncomingCheckReply, VmState,
};
use ferry_api::NetBackend;
use ipnet::Ipv4Net;

use crate::daemon::{protocol_range, Daemon};
use crate::error::{ApiError, ApiResult};
use crate::hostinfo;

pub(crate) fn item(name: &str, ok: bool, detail: String, fix: Option<String>) -> CheckItem {
    CheckItem {
        name: name.into(),
        ok,
        detail,
        fix: if ok { None } else { fix },
    }
}

/// This host's addresses inside its migration networks, as `ip/len`.
pub fn migration_addresses(d: &Daemon) -> Vec<String> {
    let nets = hostinfo::parse_nets(&d.lock().settings.migration_networks).unwrap_or_default();
    hostinfo::addresses()
        .into_iter()
        .filter(|a| hostinfo::allowed(&nets, a.ip()))
        .map(|a| a.net.to_string())
        .collect()
}

/// What the destination would tell a source about receiving `req` (no side effects).
pub fn incoming(d: &Daemon, req: &IncomingCheck) -> IncomingCheckReply {
    let g = d.lock();
    let me = &d.name;
    let mut checks = Vec::new();
    checks.push(item(
        "migration (destination)",
        g.settings.live_migration,
        if g.settings.live_migration {
            format!("{me} accepts live migrations")
        } else {
            format!("live migration is off on {me}")
        },
        Some(format!("ferry --host {me} host set --live-migration on")),
    ));
    if let Some(sec) = &d.security {
        let ok = sec.in_group(me) && sec.in_group(&req.from);
        checks.push(item(
            "migration group (destination)",
            ok,
            if ok {
                format!(
                    "{me} takes moves from {}: both are in the migration group",
                    req.from
                )
            } else {
                format!("{me} takes moves only between hosts of the migration group")
            },
            Some(format!(
                "`ferry cluster migration-group add {} {me}`",
                req.from
            )),
        ));
    }
    let ours = protocol_range();
    let overlap = req.protocol.min <= ours.max && ours.min <= req.protocol.max;
    checks.push(item(
        "version",
        overlap,
        format!(
            "{} runs ferry {} (migration protocol {}..={}), {me} runs ferry {} ({}..={})",
            req.from,
            req.version,
            req.protocol.min,
            req.protocol.max,
            env!("CARGO_PKG_VERSION"),
            ours.min,
            ours.max
        ),
        Some("upgrade the older host's ferry".into()),
    ));
    let offered = d.offered_features(&g.settings);
    let missing: Vec<&str> = req
        .cpu_features
        .iter()
        .filter(|f| !offered.contains(f))
        .map(|f| f.as_str())
        .collect();
    checks.push(item(
        "cpu",
        missing.is_empty(),
        if missing.is_empty() {
            format!(
                "{me} offers all {} CPU features {} was started with",
                req.cpu_features.len(),
                req.vm
            )
        } else {
            format!(
                "{me} does not offer CPU features {} was started with: {}",
                req.vm,
                missing.join(", ")
            )
        },
        Some(format!(
            "move to a host whose CPU has them, or start the VM on hosts that hide them (`ferry host set --cpu-hide {}` on the source, then restart the VM)",
            missing.join(",")
        )),
    ));
    let mem = d.memory(&g);
    let want = req.config.memory_mib;
    checks.push(item(
        "memory",
        want <= mem.free_for_vms_mib,
        format!(
            "{} needs {want} MiB; {me} can give VMs {} MiB more",
            req.vm, mem.free_for_vms_mib
        ),
        Some(format!(
            "free memory on {me} (stop or move a VM there), or raise its limit (`ferry --host {me} host set --memory-limit-mib N`)"
        )),
    ));
    for (i, n) in req.config.nets.iter().enumerate() {
        let (kind, name) = match &n.backend {
            NetBackend::Bridge(b) => ("bridge", b),
            NetBackend::Tap(t) => ("tap", t),
        };
        let ok = hostinfo::interface_exists(name)
            && (kind == "tap" || hostinfo::bridges().contains(name));
        checks.push(item(
            "network",
            ok,
            format!(
                "network card {i} plugs into {kind} {name}: {}",
                if ok {
                    format!("{me} has it")
                } else {
                    format!("{me} has no {kind} {name}")
                }
            ),
            Some(format!(
                "create {kind} {name} on {me} (on the same network as on {})",
                req.from
            )),
        ));
    }
    for (i, d_) in req.config.disks.iter().enumerate() {
        if let Some(t) = req.disks_to.iter().find(|t| t.index == i) {
            checks.push(disk_target(me, d_, t));
            continue;
        }
        if let Some(uri) = d_.nbd_uri() {
            // On a file server (or another NBD server): reachable from here? (Its access list
            // and lease are the file server's to enforce.)
            let addr = ferry_nbd::client::parse_uri(uri).map(|u| u.addr());
            let ok = addr.as_ref().is_ok_and(|a| {
                use std::net::ToSocketAddrs;
                a.to_socket_addrs()
                    .ok()
                    .and_then(|mut i| i.next())
                    .is_some_and(|sa| {
                        std::net::TcpStream::connect_timeout(&sa, std::time::Duration::from_secs(2))
                            .is_ok()
                    })
            });
            checks.push(item(
                "disk",
                ok,
                if ok {
                    format!("{uri} is reachable from {me}")
                } else {
                    format!("{uri} is not reachable from {me}")
                },
                Some(format!(
                    "let {me} reach the file server (network, firewall), and grant it write on the share"
                )),
            ));
            continue;
        }
        let meta = std::fs::metadata(&d_.path);
        let writable = d_.read_only
            || std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&d_.path)
                .is_ok();
        let ok = meta.as_ref().is_ok_and(|m| m.is_file()) && writable;
        checks.push(item(
            "disk",
            ok,
            match (&meta, writable) {
                (Ok(m), true) => format!(
                    "{} is reachable on {me} ({} MiB)",
                    d_.path.display(),
                    m.len() >> 20
                ),
                (Ok(_), false) => format!("{} is on {me} but cannot be written", d_.path.display()),
                (Err(e), _) => format!("{} is not reachable on {me}: {e}", d_.path.display()),
            },
            Some(format!(
                "make {} reachable at the same path on {me} (shared storage), or move the disk too",
                d_.path.display()
            )),
        ));
    }
    let taken = g.vms.contains_key(&req.vm);
    checks.push(item(
        "name",
        !taken,
        if taken {
            format!("{me} already has a VM named {}", req.vm)
        } else {
            format!("{me} has no VM named {}", req.vm)
        },
        Some(format!("rename or delete the VM {} on {me}", req.vm)),
    ));
    let my_nets = hostinfo::parse_nets(&g.settings.migration_networks).unwrap_or_default();
    drop(g);
    let src: Vec<Ipv4Net> = req
        .from_addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let mine = hostinfo::addresses();
    let ip = hostinfo::migration_ip(&mine, &my_nets, &src);
    checks.push(item(
        "migration network",
        ip.is_some(),
        match ip {
            Some(ip) => format!("{me} receives on {ip}"),
            None => format!(
                "no migration network in common: {} offers {}, {me} allows {} on {}",
                req.from,
                if req.from_addresses.is_empty() {
                    "nothing".into()
                } else {
                    req.from_addresses.join(", ")
                },
                if my_nets.is_empty() {
                    "any network".into()
                } else {
                    my_nets
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                mine.iter()
                    .map(|a| a.net.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Some(format!(
            "give both hosts a network they share in `ferry host set --migration-network CIDR` (on {} and {me})",
            req.from
        )),
    ));
    IncomingCheckReply {
        host: d.name.clone(),
        checks,
        listen_ip: ip.map(|i| i.to_string()),
    }
}

/// Whether the copy of `disk` a shared-nothing move brings can be made in `t.folder` here.
fn disk_target(me: &str, disk: &ferry_api::DiskConfig, t: &DiskTargetSpec) -> CheckItem {
    let what = format!(
        "disk {}: {} -> {me}:{}",
        t.index,
        disk.path.display(),
        t.folder.join(&t.name).display()
    );
    let bad_name = t.name.is_empty() || t.name.contains('/') || t.name.starts_with('.');
    if !t.folder.is_absolute() || bad_name {
        return item(
            "disk",
            false,
            format!("{what}: give an absolute folder and a plain file name"),
            None,
        );
    }
    if !t.folder.is_dir() {
        return item(
            "disk",
            false,
            format!("{what}: {} is not a folder on {me}", t.folder.display()),
            Some(format!(
                "create it on {me} first (mkdir -p {})",
                t.folder.display()
            )),
        );
    }
    let target = t.folder.join(&t.name);
    if target.exists() {
        return item(
            "disk",
            false,
            format!("{what}: {} exists on {me}", target.display()),
            Some("remove it, or move the disk to another folder".into()),
        );
    }
    let free = nix::sys::statvfs::statvfs(&t.folder)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    item(
        "disk",
        free >= t.allocated_bytes,
        format!(
            "{what}: needs up to {} MiB, {} MiB free there",
            t.allocated_bytes >> 20,
            free >> 20
        ),
        Some(format!("free space in {} on {me}", t.folder.display())),
    )
}

/// What a source sends the destination about `vm`.
pub fn incoming_request(d: &Daemon, vm: &str) -> ApiResult<IncomingCheck> {
    let g = d.lock();
    let v = g
        .vms
        .get(vm)
        .ok_or_else(|| ApiError::not_found(format!("no VM named {vm:?} on {}", d.name)))?;
    let mut config = v.record.config.clone();
    // The destination wires its own serial ports.
    config.serial = ferry_api::SerialBackend::Null;
    config.serial2 = ferry_api::SerialBackend::Null;
    let cpu_features = v.record.cpu_features.clone();
    drop(g);
    let plaintext_networks = d.lock().settings.plaintext_migration_networks.clone();
    Ok(IncomingCheck {
        vm: vm.into(),
        plaintext_networks,
        config,
        cpu_features,
        from: d.name.clone(),
        from_addresses: migration_addresses(d),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: protocol_range(),
        disks_to: Vec::new(),
    })
}

/// The whole check for moving `vm` from here to `to` (a peer name or address); `for_move` is
/// the move that asks (its own slot makes the VM read "moving"); `disks_to`, the disks that go
/// into the destination's folders with it.
pub async fn check_move(
    d: &Arc<Daemon>,
    vm: &str,
    to: &str,
    for_move: Option<&str>,
    disks_to: &[DiskTargetSpec],
) -> ApiResult<CheckReport> {
    let (to_name, to_addr) = d.resolve_host(to)?;
    let info = d.vm(vm)?;
    let me = d.name.clone();
    let mut checks = Vec::new();
    let on = d.lock().settings.live_migration;
    checks.push(item(
        "migration (source)",
        on,
        if on {
            format!("{me} sends live migrations")
        } else {
            format!("live migration is off on {me}")
        },
        Some(format!("ferry --host {me} host set --live-migration on")),
    ));
    let running = info.state == VmState::Running
        || (info.state == VmState::Moving
            && for_move.is_some()
            && info.move_id.as_deref() == for_move);
    checks.push(item(
        "vm",
        running,
        format!("{vm} is {:?} on {me}", info.state).to_lowercase(),
        Some(match info.state {
            VmState::Paused => format!("resume {vm} first"),
            VmState::Moving => format!("wait for {vm}'s move to end, or cancel it"),
            _ => format!("start {vm} first (`ferry vm start {vm}`); only a running VM moves live"),
        }),
    ));
    if let Some(sec) = &d.security {
        let both = sec.in_group(&me) && sec.in_group(&to_name);
        let outside: Vec<&str> = [me.as_str(), to_name.as_str()]
            .into_iter()
            .filter(|h| !sec.in_group(h))
            .collect();
        checks.push(item(
            "migration group",
            both,
            if both {
                format!("{me} and {to_name} are in the cluster's migration group")
            } else {
                format!(
                    "not in the cluster's migration group: {}",
                    outside.join(", ")
                )
            },
            Some(format!(
                "an admin adds them: `ferry cluster migration-group add {}`",
                outside.join(" ")
            )),
        ));
    }
    let mut req = incoming_request(d, vm)?;
    req.disks_to = disks_to.to_vec();
    let client = d.client_for(&to_name, &to_addr);
    match client
        .post::<_, IncomingCheckReply>("/v1/incoming/check", &req)
        .await
    {
        Ok(r) => checks.extend(r.checks),
        Err(e) => checks.push(item(
            "destination",
            false,
            format!(
                "cannot ask {to_name} ({to_addr}): {}",
                ferry_vmm::error_chain(&e)
            ),
            Some(format!(
                "is `ferry host run` running on {to_name}, and reachable from {me}?"
            )),
        )),
    }
    Ok(CheckReport {
        vm: vm.into(),
        from: me,
        to: to_name,
        ok: checks.iter().all(|c| c.ok),
        checks,
    })
}

/// This host's side of the check for `req`, and the migration address it would receive on; a
/// failed check is the error (nothing was started).
pub fn incoming_ip(d: &Daemon, req: &IncomingCheck) -> ApiResult<String> {
    let reply = incoming(d, req);
    if reply.checks.iter().any(|c| !c.ok) {
        return Err(ApiError::check_failed(CheckReport {
            vm: req.vm.clone(),
            from: req.from.clone(),
            to: d.name.clone(),
            ok: false,
            checks: reply.checks,
        }));
    }
    reply
        .listen_ip
        .ok_or_else(|| ApiError::internal("no migration address chosen"))
}
