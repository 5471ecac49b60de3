//! The OCI runtime config (`config.json`) the bench gives `crun run`: the sandbox's rootfs read-only,
//! the host's `/usr` bound read-only on top (as burrow's `system` image has it), fresh pid, mount,
//! uts, ipc and net namespaces, no network, a small capability set, and no rlimit above the current
//! hard limits (CAP_SYS_RESOURCE is not in this machine's bounding set, so a raise fails).

use std::path::Path;

use serde_json::{json, Value};

pub const NAMESPACES: &[&str] = &["pid", "mount", "uts", "ipc", "network"];

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_SETFCAP",
];

pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn config(rootfs: &Path, args: &[&str], hostname: &str) -> Value {
    let nosuid = ["nosuid", "noexec", "nodev"];
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": [PATH_ENV, "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": CAPS,
                "effective": CAPS,
                "permitted": CAPS,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true,
        },
        "root": { "path": rootfs, "readonly": true },
        "hostname": hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": [nosuid[0], nosuid[1], nosuid[2], "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": nosuid },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": [nosuid[0], nosuid[1], nosuid[2], "ro"] },
            { "destination": "/usr", "type": "bind", "source": "/usr",
              "options": ["rbind", "ro", "nosuid", "nodev"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "nodev", "mode=1777"] },
        ],
        "linux": {
            "namespaces": NAMESPACES.iter().map(|t| json!({ "type": t })).collect::<Vec<_>>(),
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Value {
        config(Path::new("/tmp/rootfs"), &["/bin/true"], "bench")
    }

    #[test]
    fn runs_the_command_on_the_given_rootfs_read_only() {
        let c = cfg();
        assert_eq!(c["process"]["args"], json!(["/bin/true"]));
        assert_eq!(c["root"]["path"], "/tmp/rootfs");
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["hostname"], "bench");
    }

    #[test]
    fn has_its_own_pid_mount_uts_ipc_and_net_namespaces_and_no_shared_one() {
        let c = cfg();
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                assert!(n.get("path").is_none(), "namespace joined, not new: {n}");
                n["type"].as_str().unwrap()
            })
            .collect();
        assert_eq!(ns, ["pid", "mount", "uts", "ipc", "network"]);
    }

    #[test]
    fn binds_host_usr_read_only_like_the_system_image() {
        let c = cfg();
        let usr = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/usr")
            .expect("a /usr mount");
        assert_eq!(usr["source"], "/usr");
        let opts: Vec<&str> = usr["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert!(opts.contains(&"ro") && opts.contains(&"rbind"), "{opts:?}");
    }

    #[test]
    fn asks_for_no_rlimit_above_what_this_machine_allows() {
        let c = cfg();
        for r in c["process"]["rlimits"].as_array().unwrap() {
            assert!(r["hard"].as_u64().unwrap() <= 1024, "{r}");
        }
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert!(c["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .all(|cap| cap != "CAP_SYS_ADMIN"));
    }
}
