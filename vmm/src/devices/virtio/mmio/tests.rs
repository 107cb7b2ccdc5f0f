use super::*;
use crate::devices::virtio::queue::tests::TestRing;
use crate::devices::virtio::DeviceFault;
use crate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(crate) fn r32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn w32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// Sets up queue `index` like a driver: select, size, ring addresses, ready.
pub(crate) fn setup_queue(dev: &mut dyn BusDevice, index: u32, ring: &TestRing) {
    w32(dev, reg::QUEUE_SEL, index);
    w32(dev, reg::QUEUE_NUM, ring.size as u32);
    for (lo, addr) in [
        (reg::QUEUE_DESC_LOW, ring.desc),
        (reg::QUEUE_DRIVER_LOW, ring.avail),
        (reg::QUEUE_DEVICE_LOW, ring.used),
    ] {
        w32(dev, lo, addr as u32);
        w32(dev, lo + 4, (addr >> 32) as u32);
    }
    w32(dev, reg::QUEUE_READY, 1);
}

/// ACKNOWLEDGE, DRIVER, accept `features` (plus VERSION_1), FEATURES_OK; returns whether
/// FEATURES_OK stuck.
pub(crate) fn negotiate(dev: &mut dyn BusDevice, features: u64) -> bool {
    w32(dev, reg::STATUS, status::ACKNOWLEDGE);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(dev, reg::DRIVER_FEATURES_SEL, 0);
    w32(dev, reg::DRIVER_FEATURES, features as u32);
    w32(dev, reg::DRIVER_FEATURES_SEL, 1);
    w32(dev, reg::DRIVER_FEATURES, (features >> 32) as u32 | 1);
    w32(dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    r32(dev, reg::STATUS) & status::FEATURES_OK != 0
}

pub(crate) fn driver_ok(dev: &mut dyn BusDevice) {
    let s = r32(dev, reg::STATUS);
    w32(dev, reg::STATUS, s | status::DRIVER_OK);
}

/// A device that returns every chain with its readable length.
#[derive(Default)]
struct Echo {
    queues: Vec<Queue>,
    mem: Option<Arc<dyn GuestMemoryAccess>>,
    irq: Option<Arc<VirtioInterrupt>>,
    config: [u8; 8],
    resets: u32,
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        0x42
    }
    fn avail_features(&self) -> u64 {
        (1 << features::VIRTIO_F_VERSION_1) | 0b101
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 8]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = *self.config.get(offset as usize + i).unwrap_or(&0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _acked: u64,
        queues: Vec<Queue>,
        mem: Arc<dyn GuestMemoryAccess>,
        irq: Arc<VirtioInterrupt>,
    ) -> Result<(), DeviceFault> {
        self.queues = queues;
        self.mem = Some(mem);
        self.irq = Some(irq);
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceFault> {
        let mem = self.mem.clone().unwrap();
        let q = &mut self.queues[index];
        while let Some(p) = q.pop(mem.as_ref()).map_err(|e| DeviceFault(e.to_string()))? {
            if let crate::devices::virtio::queue::Popped::Chain(c) = p {
                let len = c.readable().map(|d| d.len).sum();
                q.add_used(mem.as_ref(), c.head, len).map_err(|e| DeviceFault(e.to_string()))?;
            }
        }
        self.irq.as_ref().unwrap().signal_used_queue();
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.queues.clear();
    }
}

fn transport() -> (MmioTransport<Echo>, Arc<GuestMemoryMmap>) {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    (MmioTransport::new(Echo::default(), mem.clone(), irq), mem)
}

#[test]
fn identity_registers() {
    let (mut t, _) = transport();
    assert_eq!(r32(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(r32(&mut t, reg::VERSION), 2);
    assert_eq!(r32(&mut t, reg::DEVICE_ID), 0x42);
    assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 0b101);
    w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    w32(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 8);
    w32(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
    // Config space at any width.
    t.write(0x102, &[7, 8]);
    let mut b = [0u8; 4];
    t.read(0x100, &mut b);
    assert_eq!(b, [0, 0, 7, 8]);
    // A 2-byte register read is an error, not a panic.
    let mut two = [0u8; 2];
    t.read(reg::STATUS, &mut two);
    t.write(0x1fe, &[1, 2, 3, 4]);
    assert_eq!(t.stats().register_errors, 2);
}

#[test]
fn full_driver_sequence_uses_buffers_and_interrupts() {
    let (mut t, mem) = transport();
    let mut ring = TestRing::new(8, 0x10000);
    assert!(negotiate(&mut t, 0b100));
    setup_queue(&mut t, 0, &ring);
    driver_ok(&mut t);
    assert_eq!(t.stats().activations, 1);
    ring.set_desc(&mem, 0, 0x30000, 12, 0, 0);
    ring.push(&mem, 0);
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(ring.used_idx(&mem), 1);
    assert_eq!(ring.used_elem(&mem, 0), (0, 12));
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 1);
    assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
    w32(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
    // Queue 1 was never made ready: notify is counted and ignored.
    w32(&mut t, reg::QUEUE_NOTIFY, 1);
    w32(&mut t, reg::QUEUE_NOTIFY, 77);
    assert_eq!(t.stats().notify_errors, 2);
    // Setup after DRIVER_OK is ignored.
    w32(&mut t, reg::QUEUE_SEL, 1);
    w32(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.stats().queue_errors, 1);
    // Reset.
    w32(&mut t, reg::STATUS, 0);
    assert_eq!(r32(&mut t, reg::STATUS), 0);
    assert_eq!(t.device().resets, 1);
    w32(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.stats().errors(), 3);
}

/// Linux's virtio_balloon kicks its statistics queue during probe, before DRIVER_OK: the
/// buffer must not be used before DRIVER_OK, and must be used once the device is activated.
#[test]
fn a_notify_before_driver_ok_is_handled_at_activation() {
    let (mut t, mem) = transport();
    let mut ring = TestRing::new(8, 0x10000);
    assert!(negotiate(&mut t, 0));
    setup_queue(&mut t, 0, &ring);
    ring.set_desc(&mem, 0, 0x30000, 40, 0, 0);
    ring.push(&mem, 0);
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(ring.used_idx(&mem), 0, "nothing is consumed before DRIVER_OK");
    assert_eq!(t.stats().early_notifies, 1);
    // A queue that is not ready is still an error, before DRIVER_OK too.
    w32(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.stats().notify_errors, 1);
    driver_ok(&mut t);
    assert_eq!(ring.used_idx(&mem), 1, "the early notify is handled at activation");
    assert_eq!(ring.used_elem(&mem, 0), (0, 40));
    assert_eq!((t.stats().notifies, t.stats().errors()), (1, 1));
    // A reset forgets early notifies.
    w32(&mut t, reg::STATUS, 0);
    assert!(negotiate(&mut t, 0));
    let mut ring = TestRing::new(8, 0x20000);
    setup_queue(&mut t, 0, &ring);
    w32(&mut t, reg::QUEUE_NOTIFY, 0);
    w32(&mut t, reg::STATUS, 0);
    assert!(negotiate(&mut t, 0));
    setup_queue(&mut t, 0, &ring);
    ring.set_desc(&mem, 0, 0x30000, 40, 0, 0);
    ring.push(&mem, 0);
    driver_ok(&mut t);
    assert_eq!(ring.used_idx(&mem), 0, "the notify before the reset is gone");
}

fn kick_fds(n: usize) -> (Vec<Option<EventFd>>, Vec<EventFd>) {
    let fds: Vec<EventFd> = (0..n).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let guest_side = fds.iter().map(|f| f.try_clone().unwrap()).collect();
    (fds.into_iter().map(Some).collect(), guest_side)
}

/// T2 and T3: a kick signalled on the ioeventfd is processed once, by whoever reads it
/// first, and a later Status write (here: a reset) handles it before it acts.
#[test]
fn ioeventfd_kicks_are_handled_once_and_before_a_later_status_write() {
    let (mut t, mem) = transport();
    let (fds, kvm) = kick_fds(2);
    t.attach_ioeventfds(fds, 0);
    let mut ring = TestRing::new(8, 0x10000);
    assert!(negotiate(&mut t, 0));
    setup_queue(&mut t, 0, &ring);
    driver_ok(&mut t);
    ring.set_desc(&mem, 0, 0x30000, 12, 0, 0);
    ring.push(&mem, 0);
    // What KVM does for the guest's QueueNotify store: signal, no exit.
    kvm[0].write(1).unwrap();
    t.handle_kick(0);
    assert_eq!(ring.used_idx(&mem), 1);
    t.handle_kick(0);
    t.handle_kick(1);
    let s = t.stats();
    assert_eq!((s.kicks_ioeventfd, s.kicks_exit, s.notifies, s.errors()), (1, 0, 1, 0), "{s:?}");
    // A kick, then the driver resets before the event loop ran: the reset handles it first.
    ring.set_desc(&mem, 1, 0x30000, 20, 0, 0);
    ring.push(&mem, 1);
    kvm[0].write(1).unwrap();
    w32(&mut t, reg::STATUS, 0);
    assert_eq!(ring.used_idx(&mem), 2, "the kick before the reset was handled before it");
    assert_eq!(ring.used_elem(&mem, 1), (1, 20));
    t.handle_kick(0);
    let s = t.stats();
    assert_eq!((s.kicks_ioeventfd, s.notifies, s.resets, s.errors()), (2, 2, 1, 0), "{s:?}");
    assert_eq!((s.ioeventfd_queues, s.ioeventfd_refused), (2, 0));
}

/// T1 and T2 under real concurrency: one thread plays the vCPU (makes buffers available,
/// kicks through the ioeventfd, reads and acknowledges InterruptStatus, reads config and
/// status through MMIO), another the event loop (handles kicks). Every buffer comes back
/// exactly once, in order, and no access is a driver error.
#[test]
fn ioeventfd_kicks_race_free_with_the_vcpus_register_accesses() {
    const BUFFERS: u16 = 20_000;
    let (mut t, mem) = transport();
    let (fds, kvm) = kick_fds(1);
    t.attach_ioeventfds(fds, 0);
    let mut ring = TestRing::new(8, 0x10000);
    assert!(negotiate(&mut t, 0));
    setup_queue(&mut t, 0, &ring);
    driver_ok(&mut t);
    for d in 0..8u16 {
        ring.set_desc(&mem, d, 0x30000 + 0x100 * d as u64, 1 + d as u32, 0, 0);
    }
    let t = Arc::new(std::sync::Mutex::new(t));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let event_loop = {
        let (t, stop) = (t.clone(), stop.clone());
        let fd = kvm[0].try_clone().unwrap();
        std::thread::spawn(move || {
            let mut polls = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // Wait for the eventfd like epoll would, without consuming it.
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 10) };
                t.lock().unwrap().handle_kick(0);
                polls += 1;
            }
            polls
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut reaped = 0u16;
    let mut next_used = 0u16;
    while reaped < BUFFERS {
        // At most the ring's size in flight.
        while ring.avail_idx.wrapping_sub(reaped) < 8 && ring.avail_idx < BUFFERS {
            let d = ring.avail_idx % 8;
            ring.push(&mem, d);
            kvm[0].write(1).unwrap();
        }
        {
            let mut dev = t.lock().unwrap();
            let pending = r32(&mut *dev, reg::INTERRUPT_STATUS);
            w32(&mut *dev, reg::INTERRUPT_ACK, pending);
            assert_eq!(r32(&mut *dev, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
            let mut cfg = [0u8; 4];
            dev.read(CONFIG_SPACE_OFFSET, &mut cfg);
        }
        let used = ring.used_idx(&mem);
        while next_used != used {
            let (id, len) = ring.used_elem(&mem, next_used);
            assert_eq!((id, len), ((next_used % 8) as u32, 1 + (next_used % 8) as u32), "used {next_used}");
            next_used = next_used.wrapping_add(1);
            reaped += 1;
        }
        assert!(std::time::Instant::now() < deadline, "hung at {reaped} of {BUFFERS}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    event_loop.join().unwrap();
    let s = t.lock().unwrap().stats();
    assert_eq!(s.errors(), 0, "{s:?}");
    assert_eq!((s.kicks_exit, s.needs_reset), (0, 0));
    assert!(s.kicks_ioeventfd >= 1 && s.kicks_ioeventfd <= BUFFERS as u64, "{s:?}");
    assert_eq!(ring.used_idx(&mem), BUFFERS);
}

#[test]
fn bad_negotiation_is_refused() {
    let (mut t, _) = transport();
    // Bit 1 is not offered.
    assert!(!negotiate(&mut t, 0b10));
    assert_eq!(t.stats().feature_errors, 1);
    // DRIVER_OK without FEATURES_OK: DEVICE_NEEDS_RESET, no activation.
    driver_ok(&mut t);
    assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.stats().activations, 0);
    assert_eq!(t.stats().status_errors, 1);
    w32(&mut t, reg::STATUS, 0);
    // Without VERSION_1.
    w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w32(&mut t, reg::DRIVER_FEATURES, 1);
    w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // Features written after FEATURES_OK are ignored.
    w32(&mut t, reg::STATUS, 0);
    assert!(negotiate(&mut t, 1));
    w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w32(&mut t, reg::DRIVER_FEATURES, 0b10);
    assert_eq!(t.acked_features() & 0b10, 0);
    assert_eq!(t.stats().feature_errors, 3);
}

#[test]
fn bad_queues_set_needs_reset() {
    for (size, base) in [(3u16, 0x10000u64), (16, 0x10000), (8, 0xff000), (8, 0x1_0000_0000)] {
        let (mut t, _) = transport();
        assert!(negotiate(&mut t, 0));
        setup_queue(&mut t, 0, &TestRing::new(size, base));
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0, "size {size} at {base:#x}");
        assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.stats().queue_errors, 1);
        driver_ok(&mut t);
        assert_eq!(t.stats().activations, 0, "no activation while NEEDS_RESET");
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.stats().notifies, 0);
    }
}
