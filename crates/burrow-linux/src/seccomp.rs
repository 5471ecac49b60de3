//! The sandbox's seccomp filter: a deny list of the kernel surface agents have no use for and
//! attackers do (attacks K1, K3, K4, K11 in docs/threat-model.md), answered with EPERM; `clone3` answers ENOSYS so libc
//! falls back to `clone`, whose flags a filter can inspect. Calls from any other architecture or
//! ABI kill the process. See docs/adr/0003-seccomp-deny-list.md for why a deny list. The btrfs
//! subvolume, snapshot and quota ioctls are refused by number ([`crate::btrfs::SANDBOX_DENIED_IOCTLS`]):
//! a subvolume made inside a sandbox's volume would escape its size limit (docs/adr/0066).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the filter")]
    Install(#[from] seccompiler::Error),
}

/// Syscalls refused outright.
const DENIED: &[i64] = &[
    // Mounts and namespaces (K1).
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_mount_setattr,
    libc::SYS_chroot,
    // Kernel keyrings, BPF, perf, userfaultfd, io_uring (K3).
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The machine itself (K4).
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_syslog,
    libc::SYS_quotactl,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_personality,
];

const AF_ALG: u64 = 38;
const AF_PACKET: u64 = libc::AF_PACKET as u64;
const AF_VSOCK: u64 = 40;
const TIOCSTI: u32 = libc::TIOCSTI as u32;
const CLONE_NEWUSER: u64 = libc::CLONE_NEWUSER as u64;

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    TargetArch::x86_64
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, SeccompError> {
    Ok(SeccompRule::new(conds)?)
}

/// The EPERM filter.
pub fn deny_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, vec![])).collect();
    let domain = |af| Cond::new(0, Len::Dword, Op::Eq, af);
    rules.insert(
        libc::SYS_socket,
        vec![
            rule(vec![domain(AF_ALG)?])?,
            rule(vec![domain(AF_PACKET)?])?,
            rule(vec![domain(AF_VSOCK)?])?,
        ],
    );
    // No new user namespaces: the sandbox's own is the last one (K1).
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![Cond::new(
            0,
            Len::Qword,
            Op::MaskedEq(CLONE_NEWUSER),
            CLONE_NEWUSER,
        )?])?],
    );
    // TIOCSTI would push keystrokes into a terminal's input queue (K11). The btrfs subvolume and
    // quota ioctls would let a sandbox make a subvolume with no limit inside its own (R1). The
    // kernel reads the request as a 32-bit `unsigned int`: compare the low 32 bits only.
    let request = |nr: u32| rule(vec![Cond::new(1, Len::Dword, Op::Eq, u64::from(nr))?]);
    let mut ioctls = vec![request(TIOCSTI)?];
    for (nr, _) in crate::btrfs::SANDBOX_DENIED_IOCTLS {
        ioctls.push(request(*nr)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch(),
    )?;
    Ok(filter.try_into()?)
}

/// The ENOSYS filter: `clone3` passes its flags in memory a filter cannot read.
pub fn enosys_filter() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )?;
    Ok(filter.try_into()?)
}

/// Installs both filters on the calling thread (and so on everything it execs). Needs
/// `no_new_privs` first.
pub fn install() -> Result<(), SeccompError> {
    let (deny, enosys) = (deny_filter()?, enosys_filter()?);
    seccompiler::apply_filter(&deny)?;
    seccompiler::apply_filter(&enosys)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_to_bounded_bpf() {
        let deny = deny_filter().unwrap();
        let enosys = enosys_filter().unwrap();
        // A classic BPF program has at most 4096 instructions.
        assert!(
            deny.len() > DENIED.len() && deny.len() < 4096,
            "{} instructions",
            deny.len()
        );
        assert!(!enosys.is_empty());
    }

    #[test]
    fn the_attack_table_syscalls_are_denied() {
        for nr in [
            libc::SYS_mount,
            libc::SYS_keyctl,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_kexec_load,
            libc::SYS_open_tree,
        ] {
            assert!(DENIED.contains(&nr), "syscall {nr} not denied");
        }
    }

    /// Runs `f` on a fresh thread with the sandbox's EPERM filter installed (only that thread is
    /// filtered) and returns what it returns.
    fn filtered<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            crate::caps::no_new_privs().unwrap();
            seccompiler::apply_filter(&deny_filter().unwrap()).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno_of(nr: u32) -> Option<i32> {
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let mut buf = vec![0u8; 4096];
        crate::btrfs::raw_ioctl(&dir, nr, buf.as_mut_ptr())
            .err()
            .and_then(|e| e.raw_os_error())
    }

    #[test]
    fn btrfs_subvolume_and_quota_ioctls_are_refused_and_reflinks_are_not() {
        for (nr, name) in crate::btrfs::SANDBOX_DENIED_IOCTLS {
            let nr = *nr;
            // Unfiltered, the call reaches the filesystem (which refuses it its own way).
            assert_ne!(errno_of(nr), Some(libc::EPERM), "{name} unfiltered");
            assert_eq!(filtered(move || errno_of(nr)), Some(libc::EPERM), "{name}");
            // The kernel ignores the upper 32 bits of the request; so does the filter.
            let wide = u64::from(nr) | 0xffff_ffff_0000_0000;
            let got = filtered(move || {
                let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
                let mut buf = vec![0u8; 4096];
                crate::btrfs::raw_ioctl_wide(&dir, wide, buf.as_mut_ptr())
                    .err()
                    .and_then(|e| e.raw_os_error())
            });
            assert_eq!(got, Some(libc::EPERM), "{name} with high bits set");
        }
        let ficlone = crate::btrfs::FICLONE;
        assert_ne!(filtered(move || errno_of(ficlone)), Some(libc::EPERM));
    }
}
