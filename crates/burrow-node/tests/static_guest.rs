//! The guest agent burrow carries is static: no dynamic loader is named in it, so it runs as PID 1
//! in any image (glibc, musl, busybox-only, no shell), and it does run in an empty root.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use burrow_node::STATIC_GUEST;

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as usize
}

/// The `p_type`s of an ELF64 little-endian executable's program headers.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "not ELF64 little-endian");
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(elf, 0x36), u16_at(elf, 0x38));
    (0..count)
        .map(|i| {
            let at = phoff + i * size;
            u32::from_le_bytes(elf[at..at + 4].try_into().unwrap())
        })
        .collect()
}

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_LOAD: u32 = 1;

#[test]
fn the_guest_names_no_dynamic_loader() {
    let types = program_header_types(STATIC_GUEST);
    assert!(types.contains(&PT_LOAD), "{types:?}");
    assert!(
        !types.contains(&PT_INTERP),
        "the guest asks for a dynamic loader; it would not start in an image without the host's libc"
    );
    // The host's own dynamically linked binaries do have one: the check can fail.
    let host = std::fs::read("/bin/sh").unwrap();
    let host_types = program_header_types(&host);
    assert!(host_types.contains(&PT_INTERP) && host_types.contains(&PT_DYNAMIC));
}

#[test]
fn the_guest_runs_in_an_empty_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: chroot into an empty directory needs root; CI runs it as root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let exe = root.path().join("guest");
    std::fs::write(&exe, STATIC_GUEST).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    // An unknown flag: the guest starts, parses its arguments and says how to call it. Nothing
    // else is in the root, so a missing loader or library would fail before that.
    let out = Command::new("chroot")
        .arg(root.path())
        .args(["/guest", "--no-such-flag"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("usage: burrow-guest"), "{err}");
}
