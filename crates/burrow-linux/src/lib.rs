//! Every syscall burrow makes to build a sandbox lives here, behind small safe functions: cgroups
//! (v1 and v2), loop devices, btrfs subvolumes and quotas (`btrfs`), capabilities, seccomp, detached and idmapped mounts (`mount`),
//! opening paths inside a sandbox's root without following its links (`fs`), and the odd ioctl.
//! All `unsafe` in burrow is in this crate, each block with a `// SAFETY:` note.

pub mod btrfs;
pub mod caps;
pub mod cgroup;
pub mod fs;
pub mod loopdev;
pub mod mount;
pub mod net;
pub mod proc;
pub mod seccomp;
pub mod sys;
