//! What a host is: its addresses, bridges, memory, CPU. Read from the kernel on demand (and the
//! CPU features KVM offers once, at start).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// One IPv4 address of this host with its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub ifname: String,
    pub net: Ipv4Net,
}

impl Addr {
    pub fn ip(&self) -> Ipv4Addr {
        self.net.addr()
    }
}

/// This host's IPv4 addresses (loopback left out).
pub fn addresses() -> Vec<Addr> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for i in ifs {
        if i.interface_name == "lo" {
            continue;
        }
        let (Some(a), Some(m)) = (
            i.address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
            i.netmask
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
        ) else {
            continue;
        };
        let len = u32::from(m).leading_ones() as u8;
        if let Ok(net) = Ipv4Net::new(a, len) {
            addrs.push(Addr {
                ifname: i.interface_name.clone(),
                net,
            });
        }
    }
    addrs
}

/// Linux bridges on this host.
pub fn bridges() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("bridge").is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Whether a network interface exists.
pub fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// (total, available) memory in MiB, from /proc/meminfo.
pub fn memory_mib() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0)
    };
    (get("MemTotal:"), get("MemAvailable:"))
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether `ip` lies in one of `nets` (an empty list allows any).
pub fn allowed(nets: &[Ipv4Net], ip: Ipv4Addr) -> bool {
    nets.is_empty() || nets.iter().any(|n| n.contains(&ip))
}

/// Parse CIDRs; the first bad one is the error.
pub fn parse_nets(list: &[String]) -> Result<Vec<Ipv4Net>, String> {
    list.iter()
        .map(|s| {
            s.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|_| format!("{s:?} is not an IPv4 network like 10.0.0.0/24"))
        })
        .collect()
}

/// Pick the address this host should receive a migration on: one of `mine` inside this host's
/// allowed networks, on the same network as one of the source's addresses (which are inside the
/// source's allowed networks). `None`: no network in common.
pub fn migration_ip(mine: &[Addr], my_nets: &[Ipv4Net], source: &[Ipv4Net]) -> Option<Ipv4Addr> {
    mine.iter()
        .filter(|a| allowed(my_nets, a.ip()))
        .find(|a| {
            source.iter().any(|s| {
                a.net.trunc().contains(&s.addr())
                    && allowed(my_nets, s.addr())
                    && s.trunc().contains(&a.ip())
            })
        })
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Addr {
        Addr {
            ifname: "br0".into(),
            net: s.parse().unwrap(),
        }
    }

    #[test]
    fn migration_network_choice() {
        let mine = vec![addr("192.168.1.5/24"), addr("10.78.0.12/24")];
        let src: Vec<Ipv4Net> = vec!["10.78.0.11/24".parse().unwrap()];
        assert_eq!(
            migration_ip(&mine, &[], &src),
            Some("10.78.0.12".parse().unwrap())
        );
        let only: Vec<Ipv4Net> = vec!["10.99.0.0/16".parse().unwrap()];
        assert_eq!(migration_ip(&mine, &only, &src), None);
        let lab: Vec<Ipv4Net> = vec!["10.78.0.0/24".parse().unwrap()];
        assert_eq!(
            migration_ip(&mine, &lab, &src),
            Some("10.78.0.12".parse().unwrap())
        );
        assert!(parse_nets(&["10.0.0.0/8".into()]).is_ok());
        assert!(parse_nets(&["10.0.0/8".into()]).is_err());
    }
}
