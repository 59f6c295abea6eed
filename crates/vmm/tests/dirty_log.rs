//! Dirty-page tracking on a real guest: KVM's log catches the guest's writes, the VMM's own
//! bitmap catches the VMM's writes, and a paused guest dirties nothing.

use std::time::Duration;

use ferry_api::VmConfig;
use ferry_vmm::memory::{self, PAGE_SIZE};
use ferry_vmm::{RunOptions, Vm};
use vm_memory::{Bytes, GuestAddress};

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "/dev/kvm is not usable and CI=true"
        );
        eprintln!("SKIPPED: /dev/kvm is not usable");
    }
    ok
}

#[test]
fn dirty_log_is_kvm_log_or_vmm_writes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("g.elf");
    std::fs::write(&kernel, ferry_testguest::elf()).unwrap();
    let mut config = VmConfig::new(&kernel);
    config.memory_mib = 128;
    // 8 MiB working set rewritten flat out, no heartbeat.
    config.cmdline = "mode=run hb=0 dirty=8 rate=0".into();
    let mut vm = Vm::create(config, RunOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    memory::start_dirty_log(vm.vm_fd(), vm.memory()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let running = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    let ws_pages = (8 << 20) / PAGE_SIZE as u64;
    assert!(
        running.count() >= ws_pages,
        "a guest rewriting {ws_pages} pages must show at least that many dirty pages, got {}",
        running.count()
    );
    assert!(
        running.count() < (128 << 20) / PAGE_SIZE as u64 / 2,
        "most of memory is untouched"
    );

    vm.pause().unwrap();
    // Pausing races with the last writes; one more pass drains them.
    let _ = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    let paused = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    assert_eq!(paused.count(), 0, "a paused guest dirties nothing");

    // A write by the VMM itself (as a virtio device would make) is in the next pass.
    let gpa = 100 << 20;
    vm.memory()
        .write_obj(0xfeed_u64, GuestAddress(gpa + 24))
        .unwrap();
    let vmm_written = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    assert_eq!(vmm_written.count(), 1);
    assert!(vmm_written.is_dirty(gpa));
    let again = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    assert_eq!(again.count(), 0, "taking the dirty set clears it");

    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let resumed = memory::take_dirty(vm.vm_fd(), vm.memory()).unwrap();
    assert!(
        resumed.count() >= ws_pages / 4,
        "logging continues after resume: {}",
        resumed.count()
    );
    memory::stop_dirty_log(vm.vm_fd(), vm.memory()).unwrap();
}
