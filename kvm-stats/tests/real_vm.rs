//! The reader against the host's KVM: a real VM's and vCPU's stats fds, their descriptors and
//! values, and deltas that follow what a tiny guest did. Needs `/dev/kvm` (Linux 5.14 or later).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use kvm_stats::{KvmStatsReader, StatKind, StatsFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Whether the host's KVM is PVM (the `kvm_pvm` module), which runs real-mode guest code in KVM's
/// instruction emulator instead of VMX/SVM.
fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn descriptors_and_values_of_a_real_vm() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let vm_stats = StatsFd::for_vm(&vm).unwrap();
    let vcpu_stats = StatsFd::for_vcpu(&vcpu).unwrap();
    for (what, fd) in [("VM", &vm_stats), ("vCPU", &vcpu_stats)] {
        println!("{what} stats ({}), id {:?}:", fd.descriptors().len(), fd.id());
        for d in fd.descriptors() {
            println!(
                "  {:<32} {:<11} unit {:?} base {:?} exp {} size {}",
                d.name,
                d.kind.to_string(),
                d.unit,
                d.base,
                d.exponent,
                d.size
            );
        }
    }
    let vm_snap = vm_stats.read().unwrap();
    let vcpu_snap = vcpu_stats.read().unwrap();
    for name in ["pages_4k", "pages_2m", "remote_tlb_flush", "remote_tlb_flush_requests"] {
        assert!(vm_snap.value(name).is_some(), "VM stat {name} missing");
    }
    for name in ["exits", "io_exits", "mmio_exits", "pf_fixed", "pf_taken", "tlb_flush"] {
        assert!(vcpu_snap.value(name).is_some(), "vCPU stat {name} missing");
    }
    // Kinds as the kernel declares them: exits count, pages_4k is a level.
    assert_eq!(vcpu_stats.layout().desc("exits").unwrap().kind, StatKind::Cumulative);
    assert_eq!(vm_stats.layout().desc("pages_4k").unwrap().kind, StatKind::Instant);
    assert_eq!(vcpu_stats.descriptors()[0].name, vcpu_snap.iter().next().unwrap().0.name);
    assert!(vm_stats.id().starts_with("kvm-"), "id {:?}", vm_stats.id());
    assert!(vcpu_stats.id().contains("vcpu"), "id {:?}", vcpu_stats.id());
    // KvmStatsReader gives the same names.
    let reader = KvmStatsReader::new(&vm, [&vcpu]).unwrap();
    let all = reader.read().unwrap();
    assert_eq!(all.nr_vcpus, 1);
    assert!(all.vm.contains_key("pages_4k") && all.vcpus.contains_key("exits"));
    // The fd outlives the VM fd it came from.
    drop(reader);
    drop(vcpu);
    drop(vm);
    assert!(vm_stats.read().unwrap().value("pages_4k").is_some());
}

#[test]
fn deltas_follow_a_guest_s_port_writes() {
    const OUTS: usize = 5;
    // Declared before the VM, so dropped after it: the memslot never outlives its backing.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 0x10000,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `host` is the start of the 0x10000-byte mapping owned by `mem`, which is declared
    // before `vm` and therefore dropped after it, so the slot's backing stays mapped for the VM's
    // whole life.
    unsafe { vm.set_user_memory_region(region).unwrap() };

    // Real mode at 0x1000: mov dx, 0x3f8; mov al, 'a'; out dx, al (×OUTS); hlt
    let mut code = vec![0xba, 0xf8, 0x03, 0xb0, b'a'];
    code.extend(std::iter::repeat_n(0xee, OUTS));
    code.push(0xf4);
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let reader = KvmStatsReader::new(&vm, [&vcpu]).unwrap();
    let vm_before = reader.vm.read().unwrap();
    let vcpu_before = reader.vcpus[0].read().unwrap();
    let all_before = reader.read().unwrap();

    let mut outs = 0;
    let mut halted = false;
    for _ in 0..100 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, [b'a']) => outs += 1,
            VcpuExit::Hlt => {
                halted = true;
                break;
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert!(halted, "guest did not reach hlt");
    assert_eq!(outs, OUTS);

    let vm_delta = reader.vm.read().unwrap().delta(&vm_before);
    let vcpu_delta = reader.vcpus[0].read().unwrap().delta(&vcpu_before);
    let all_delta = reader.read().unwrap().delta(&all_before);
    println!("VM delta:   {vm_delta}");
    println!("vCPU delta: {vcpu_delta}");
    println!("aggregated: {all_delta:?}");
    // Every `out` is a KVM_RUN return, counted in "exits". Where the `out` is counted besides
    // depends on who executed it: VMX/SVM intercept it (io_exits); PVM runs real-mode code in
    // KVM's instruction emulator (insn_emulation), whose port I/O does not count io_exits.
    let also = if is_pvm() { "insn_emulation" } else { "io_exits" };
    for name in ["exits", also] {
        let change = vcpu_delta.change(name).unwrap();
        assert!(change >= OUTS as i128, "{name} moved by {change}, want >= {OUTS}");
        assert!(all_delta.vcpus[name].change >= OUTS as i128);
    }
}
