//! The host daemon's API as an OpenAPI 3.1 document, built from the very serde types the
//! daemon and the CLI use (their JSON Schemas come from `schemars`, which follows serde's
//! attributes), so the document cannot drift from the code. `crates/api/openapi.json` is this
//! document checked in; a test fails when the two differ (`UPDATE_OPENAPI=1` rewrites it), and
//! the daemon's end-to-end tests check its real answers against the schemas here.

use schemars::{generate::SchemaSettings, JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::cluster::*;
use crate::host::*;
use crate::VmConfig;

/// Where the schemas live in the document.
pub const SCHEMAS: &str = "#/components/schemas";

struct Doc {
    gen: SchemaGenerator,
    paths: Map<String, Value>,
}

impl Doc {
    fn schema<T: JsonSchema>(&mut self) -> Value {
        self.gen.subschema_for::<T>().to_value()
    }

    fn op(
        &mut self,
        method: &str,
        path: &str,
        summary: &str,
        request: Option<Value>,
        ok: (u16, &str, Option<Value>),
        errors: &[u16],
    ) {
        let error = self.schema::<ErrorBody>();
        let mut responses = Map::new();
        let mut okr = json!({ "description": ok.1 });
        if let Some(s) = ok.2 {
            okr["content"] = json!({ "application/json": { "schema": s } });
        }
        responses.insert(ok.0.to_string(), okr);
        for code in errors {
            let what = match code {
                400 => "Malformed request: the body or a field is not what this endpoint takes.",
                403 => "Refused: not allowed for this caller, or by a host setting (e.g. live migration off).",
                404 => "No such VM, move or endpoint.",
                409 => "Conflicts with the current state (e.g. the VM runs, or is moving).",
                422 => "The compatibility check failed; nothing was changed.",
                503 => "Busy: no free migration slot.",
                _ => "Error.",
            };
            responses.insert(
                code.to_string(),
                json!({ "description": what, "content": { "application/json": { "schema": error.clone() } } }),
            );
        }
        responses.insert(
            "500".into(),
            json!({ "description": "The daemon failed; the body says why.", "content": { "application/json": { "schema": error } } }),
        );
        let mut o = json!({ "summary": summary, "responses": responses });
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({ "name": p, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !params.is_empty() {
            o["parameters"] = Value::Array(params);
        }
        if let Some(r) = request {
            o["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": r } } });
        }
        let entry = self
            .paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}));
        entry[method] = o;
    }
}

impl Doc {
    fn new() -> Doc {
        Doc {
            gen: SchemaSettings::draft2020_12()
                .with(|s| s.definitions_path = SCHEMAS.into())
                .into_generator(),
            paths: Map::new(),
        }
    }

    fn finish(mut self, title: &str, description: &str) -> Value {
        let schemas = self.gen.take_definitions(true);
        json!({
            "openapi": "3.1.0",
            "info": {
                "title": title,
                "version": env!("CARGO_PKG_VERSION"),
                "description": description,
            },
            "paths": self.paths,
            "components": { "schemas": schemas },
        })
    }
}

/// The document.
pub fn document() -> Value {
    let mut d = Doc::new();
    let host = d.schema::<HostInfo>();
    let patch = d.schema::<HostSettingsPatch>();
    let vm = d.schema::<VmInfo>();
    let vms = d.schema::<VmList>();
    let create = d.schema::<VmCreate>();
    let stop = d.schema::<VmStop>();
    let mv = d.schema::<MoveInfo>();
    let mvs = d.schema::<MoveList>();
    let req = d.schema::<MoveRequest>();
    let check = d.schema::<CheckReport>();
    let fc = d.schema::<crate::MigrationForecast>();
    let evac = d.schema::<EvacuateRequest>();
    let evaci = d.schema::<EvacuateInfo>();
    let ic = d.schema::<IncomingCheck>();
    let icr = d.schema::<IncomingCheckReply>();
    let ir = d.schema::<IncomingRequest>();
    let irr = d.schema::<IncomingReply>();
    let dtrr = d.schema::<DiskTargetReply>();
    let ii = d.schema::<IncomingInfo>();
    let settle = d.schema::<SettleReply>();
    let _ = d.schema::<VmConfig>();
    let cinfo = d.schema::<ClusterInfo>();
    let treq = d.schema::<TokenRequest>();
    let trep = d.schema::<TokenReply>();
    let rem = d.schema::<RemoveRequest>();
    let grp = d.schema::<GroupRequest>();
    let push = d.schema::<DocPush>();
    let ver = d.schema::<DocVersion>();
    let audit = d.schema::<AuditList>();
    let jreq = d.schema::<JoinRequest>();
    let jrep = d.schema::<JoinReply>();
    let ca = d.schema::<CaInfo>();

    d.op(
        "get",
        "/v1/host",
        "This host: settings, memory, CPU, bridges, VMs, moves.",
        None,
        (200, "The host.", Some(host.clone())),
        &[],
    );
    d.op(
        "patch",
        "/v1/host",
        "Change this host's migration settings (what is given changes).",
        Some(patch),
        (200, "The host after the change.", Some(host)),
        &[400],
    );
    d.op(
        "get",
        "/v1/vms",
        "The VMs defined on this host.",
        None,
        (200, "Every VM.", Some(vms)),
        &[],
    );
    d.op(
        "post",
        "/v1/vms",
        "Define a VM (and start it, if asked).",
        Some(create),
        (201, "The VM.", Some(vm.clone())),
        &[400, 409],
    );
    d.op(
        "get",
        "/v1/vms/{name}",
        "One VM.",
        None,
        (200, "The VM.", Some(vm.clone())),
        &[404],
    );
    d.op(
        "delete",
        "/v1/vms/{name}",
        "Delete a stopped VM's definition (its disk images stay).",
        None,
        (204, "Deleted.", None),
        &[404, 409],
    );
    d.op(
        "post",
        "/v1/vms/{name}/start",
        "Start a VM's VMM.",
        None,
        (200, "The VM, starting or running.", Some(vm.clone())),
        &[404, 409],
    );
    d.op(
        "post",
        "/v1/vms/{name}/stop",
        "Stop a VM's VMM (quit, or kill with force).",
        Some(stop),
        (200, "The VM, stopped.", Some(vm)),
        &[404, 409],
    );
    d.op(
        "get",
        "/v1/vms/{name}/console",
        "The VM's serial port (COM1; `?port=2` for COM2) as a WebSocket: binary frames both ways.",
        None,
        (101, "Switching to the WebSocket protocol.", None),
        &[400, 404, 409],
    );
    d.op(
        "post",
        "/v1/moves/check",
        "Check whether a VM can move to a host; moves nothing.",
        Some(req.clone()),
        (200, "The report (ok or not).", Some(check)),
        &[400, 403, 404],
    );
    d.op(
        "post",
        "/v1/moves/forecast",
        "Forecast a move of a VM to another host, moving nothing: the check, then a few seconds of sampling the guest's dirty rate and the link (the destination answers probes on the address and with the encryption a move would use).",
        Some(req.clone()),
        (200, "The forecast: measured figures and the predicted total time, pause, bytes and mode.", Some(fc)),
        &[400, 403, 404, 409, 422],
    );
    d.op("post", "/v1/moves", "Check, then move a running VM live to another host. The move is a resource: poll it or follow its events.", Some(req), (202, "The move, started or queued.", Some(mv.clone())), &[400, 403, 404, 409, 422]);
    d.op(
        "get",
        "/v1/moves",
        "Moves sent from this host (recent and running).",
        None,
        (200, "Moves.", Some(mvs)),
        &[],
    );
    d.op(
        "get",
        "/v1/moves/{id}",
        "One move.",
        None,
        (200, "The move.", Some(mv.clone())),
        &[404],
    );
    d.op(
        "get",
        "/v1/moves/{id}/events",
        "The move as server-sent events: one `MoveInfo` (JSON) per event, the last one final.",
        None,
        (200, "text/event-stream of MoveInfo.", None),
        &[404],
    );
    d.op(
        "post",
        "/v1/moves/{id}/cancel",
        "Cancel a move that has not committed; the VM stays here, running.",
        None,
        (200, "The move.", Some(mv)),
        &[404, 409],
    );
    d.op(
        "post",
        "/v1/evacuate",
        "Move every running VM off this host, within its limits.",
        Some(evac),
        (
            202,
            "The moves started, and the VMs left where they are, with reasons.",
            Some(evaci),
        ),
        &[400, 403],
    );
    d.op(
        "post",
        "/v1/incoming/check",
        "(Daemon to daemon.) Could this host receive the VM?",
        Some(ic.clone()),
        (200, "This host's side of the check.", Some(icr)),
        &[400],
    );
    d.op(
        "post",
        "/v1/incoming/probe",
        "(Daemon to daemon.) Answer a forecast's link probes for 30 s; receives nothing.",
        Some(ic),
        (200, "Where the source's VMM probes.", Some(irr.clone())),
        &[400, 403, 422],
    );
    d.op(
        "post",
        "/v1/incoming",
        "(Daemon to daemon.) Start a receiving VMM for a move.",
        Some(ir.clone()),
        (201, "Where the source VMM connects.", Some(irr)),
        &[400, 403, 409, 422, 503],
    );
    d.op(
        "post",
        "/v1/disk-targets",
        "(Daemon to daemon.) A shared-nothing move's destination: check its folders, or make the empty copies and serve them over NBD to the source host for that move only.",
        Some(ir),
        (201, "Where the source writes each copy.", Some(dtrr)),
        &[400, 403, 409, 422],
    );
    d.op(
        "delete",
        "/v1/disk-targets/{id}",
        "(Daemon to daemon.) The move failed before its VM ran here: stop serving its copies and remove them.",
        None,
        (204, "Removed (or there was nothing).", None),
        &[403, 409],
    );
    d.op(
        "get",
        "/v1/incoming/{id}",
        "(Daemon to daemon.) An arriving move.",
        None,
        (200, "The move as this host sees it.", Some(ii.clone())),
        &[404],
    );
    d.op("post", "/v1/incoming/{id}/settle", "(Daemon to daemon.) The move's outcome: committed, or aborted for good (decided now if it was not).", None, (200, "The outcome that stands.", Some(settle)), &[404]);
    d.op(
        "post",
        "/v1/incoming/{id}/abort",
        "(Daemon to daemon.) Give up an arriving move that has not committed.",
        None,
        (200, "The move.", Some(ii)),
        &[404, 409],
    );
    d.op(
        "get",
        "/v1/openapi.json",
        "This document.",
        None,
        (200, "OpenAPI 3.1.", Some(json!({"type": "object"}))),
        &[],
    );

    d.op("get", "/v1/audit", "This host's audit trail: who asked for what, how it was authorised, every refusal with its reason.", None, (200, "The last entries.", Some(audit)), &[403]);
    d.op(
        "get",
        "/v1/cluster",
        "The cluster document this host holds, decoded.",
        None,
        (200, "The cluster.", Some(cinfo.clone())),
        &[409],
    );
    d.op(
        "get",
        "/v1/cluster/doc",
        "The signed cluster document (also on the enrolment port).",
        None,
        (200, "The document.", Some(push.clone())),
        &[409],
    );
    d.op(
        "post",
        "/v1/cluster/doc",
        "A newer signed cluster document; taken only if it verifies and is newer.",
        Some(push),
        (200, "The version now held.", Some(ver.clone())),
        &[400],
    );
    d.op(
        "get",
        "/v1/cluster/version",
        "The version of the cluster document this host holds.",
        None,
        (200, "The version.", Some(ver)),
        &[409],
    );
    d.op(
        "post",
        "/v1/cluster/tokens",
        "(Authority.) A one-time join token for a host, admin or file server.",
        Some(treq),
        (200, "The token.", Some(trep)),
        &[400, 403, 409],
    );
    d.op(
        "post",
        "/v1/cluster/remove",
        "(Authority.) Take a party out of the cluster: its certificates are revoked.",
        Some(rem),
        (200, "The cluster after.", Some(cinfo.clone())),
        &[400, 403, 409],
    );
    d.op(
        "post",
        "/v1/cluster/migration-group",
        "(Authority.) Add a host to the migration group, or take it out.",
        Some(grp),
        (200, "The cluster after.", Some(cinfo)),
        &[400, 403, 409],
    );
    d.op("get", "/v1/cluster/ca", "(Enrolment port, no client certificate.) The authority's certificate, to check against a join token's pin.", None, (200, "The certificate.", Some(ca)), &[409]);
    d.op("post", "/v1/cluster/join", "(Enrolment port, no client certificate.) Enrol with a one-time join token and a certificate request made where the key lives.", Some(jreq), (200, "The certificate, the authority's, and the cluster document.", Some(jrep)), &[400, 403, 409]);

    d.finish("ferry host daemon", "The management API of `ferry host run`: VMs, host migration settings and live moves. HTTP/1.1 + JSON on the daemon's address and its local unix socket. Errors are 4xx/5xx with an ErrorBody.")
}

/// The file server's document (`ferry share run`).
pub fn share_document() -> Value {
    use crate::share::*;
    let mut d = Doc::new();
    let info = d.schema::<ShareServerInfo>();
    let create = d.schema::<ShareCreate>();
    let share = d.schema::<ShareInfo>();
    let list = d.schema::<ShareList>();
    let acc = d.schema::<AccessSet>();
    let dc = d.schema::<DiskCreate>();
    let disk = d.schema::<DiskInfo>();
    let lease = d.schema::<LeaseRequest>();
    let copy = d.schema::<DiskCopy>();
    let copied = d.schema::<DiskCopyReport>();
    d.op(
        "get",
        "/v1/share-server",
        "This file server.",
        None,
        (200, "The server.", Some(info)),
        &[],
    );
    d.op(
        "get",
        "/v1/shares",
        "Every share, with its access list and disks.",
        None,
        (200, "The shares.", Some(list)),
        &[403],
    );
    d.op(
        "post",
        "/v1/shares",
        "(Admin.) Make a share.",
        Some(create),
        (201, "The share.", Some(share.clone())),
        &[400, 403, 409],
    );
    d.op(
        "get",
        "/v1/shares/{share}",
        "One share.",
        None,
        (200, "The share.", Some(share.clone())),
        &[403, 404],
    );
    d.op(
        "delete",
        "/v1/shares/{share}",
        "(Admin.) Remove an empty share (its folder stays).",
        None,
        (204, "Gone.", None),
        &[403, 404, 409],
    );
    d.op(
        "put",
        "/v1/shares/{share}/access/{host}",
        "(Admin.) Let a host read, or read and write, the share's disks.",
        Some(acc),
        (200, "The share after.", Some(share.clone())),
        &[400, 403, 404],
    );
    d.op(
        "delete",
        "/v1/shares/{share}/access/{host}",
        "(Admin.) Take a host off the share's access list; its connections are cut.",
        None,
        (200, "The share after.", Some(share)),
        &[403, 404],
    );
    d.op(
        "post",
        "/v1/shares/{share}/disks",
        "(Admin.) Make a sparse raw disk image on the share.",
        Some(dc),
        (201, "The disk.", Some(disk.clone())),
        &[400, 403, 404, 409],
    );
    d.op(
        "get",
        "/v1/shares/{share}/disks/{disk}",
        "One disk: size, allocation, its lease.",
        None,
        (200, "The disk.", Some(disk.clone())),
        &[403, 404],
    );
    d.op(
        "delete",
        "/v1/shares/{share}/disks/{disk}",
        "(Admin.) Delete a disk nobody holds a lease on.",
        None,
        (204, "Gone.", None),
        &[403, 404, 409],
    );
    d.op("post", "/v1/shares/{share}/disks/{disk}/copy", "(Admin.) Copy a disk nobody writes to another name or share on this file server; holes stay holes.", Some(copy), (201, "The copy and what it took.", Some(copied)), &[400, 403, 404, 409]);
    d.op("post", "/v1/shares/{share}/disks/{disk}/lease", "Acquire or release the disk's write lease (a host with write access, for itself), or break it (an admin).", Some(lease), (200, "The disk after.", Some(disk)), &[400, 403, 404, 409]);
    d.finish("ferry file server", "The management API of `ferry share run`: shares, access lists, disks and write leases. HTTP/1.1 + JSON over mutual TLS and the server's local unix socket; disks themselves are served over NBD. Errors are 4xx/5xx with an ErrorBody.")
}

fn text(doc: Value) -> String {
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// The document as checked in (pretty JSON with a final newline).
pub fn document_text() -> String {
    text(document())
}

/// The file server's document as checked in.
pub fn share_document_text() -> String {
    text(share_document())
}

/// The schema of component `name` with every `$ref` resolvable against the whole document:
/// for validating a response against, say, `MoveInfo`.
pub fn component_schema(doc: &Value, name: &str) -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("{SCHEMAS}/{name}"),
        "components": doc["components"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let want = document_text();
        if std::env::var("UPDATE_OPENAPI").is_ok() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "crates/api/openapi.json is out of date with the API types: run UPDATE_OPENAPI=1 cargo test -p ferry-api"
        );
    }

    #[test]
    fn the_checked_in_share_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi-share.json");
        let want = share_document_text();
        if std::env::var("UPDATE_OPENAPI").is_ok() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "crates/api/openapi-share.json is out of date with the API types: run UPDATE_OPENAPI=1 cargo test -p ferry-api"
        );
    }

    #[test]
    fn every_reference_resolves() {
        for doc in [document(), share_document()] {
            check_refs(&doc);
        }
    }

    fn check_refs(doc: &Value) {
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"").skip(1) {
            let target = r.split('"').next().unwrap();
            let name = target.strip_prefix(&format!("{SCHEMAS}/")).unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling $ref {target}"
            );
        }
    }
}
