//! The Linux kernel's own NBD client (`nbd-client` + nbd.ko) against essd,
//! inside a small VM booted under qemu TCG by `scripts/vm-test`: a file
//! system made, written, checked and read back on a plain volume and on a
//! duplex PPRC primary whose secondary (a second essd in the VM) must be
//! read-only to the kernel and end identical; then a site failover as the
//! hosts see it: the primary's server killed while the file system is
//! written, the secondary taken over, mounted and written, the old primary
//! failed back and switched back with its file system checked.

mod common;

use std::process::Command;

#[test]
fn kernel_nbd_client_mkfs_mount_fsck_in_vm() {
    common::require_root("the VM test (apt-get download, qemu)");
    common::require("qemu-system-x86_64", "qemu-system-x86");
    common::require("busybox", "busybox-static");
    common::require("nbd-client", "nbd-client");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vm-test");
    let out = Command::new("bash")
        .arg(script)
        .env("ESSD_BIN", common::essd_bin())
        .env("ESSCTL_BIN", env!("CARGO_BIN_EXE_essctl"))
        .output()
        .expect("run scripts/vm-test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/vm-test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "VM-STEP mkfs ok",
        "VM-STEP e2fsck ok",
        "VM-STEP verify-restarted ok",
        "VM-STEP pprc-duplex ok",
        "VM-STEP pprc-secondary-read-only ok",
        "VM-STEP pprc-secondary-e2fsck ok",
        "VM-STEP pprc-secondary-verify ok",
        "VM-STEP site-primary-killed ok",
        "VM-STEP site-b-durable ok",
        "VM-STEP site-b-e2fsck ok",
        "VM-STEP site-failback ok",
        "VM-STEP site-switch-back ok",
        "VM-STEP site-a-e2fsck ok",
        "VM-STEP site-a-verify ok",
        "VM-STEP pprc-identical ok",
        "VM-STEP kernel-log-end ok",
        "VM-TEST: PASS",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
}
