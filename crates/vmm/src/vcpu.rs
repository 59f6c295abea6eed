//! One vCPU: its boot registers, its complete saveable state, and the thread that runs it.
//!
//! A vCPU thread is a small state machine:
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Running
//!     [*] --> Paused: restored with --paused
//!     Running --> Paused: Pause (kick + ack)
//!     Paused --> Running: Resume
//!     Paused --> Paused: Save -> VcpuState
//!     Running --> Stopped: guest poweroff / reset / KVM error (event to the VMM)
//!     Running --> [*]: Exit
//!     Paused --> [*]: Exit
//!     Stopped --> [*]: Exit
//! ```
//!
//! Only a paused vCPU's state can be saved, so a saved state is always consistent.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use ferry_devices::VmAction;
use ferry_migration::Persist;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::boot::{self, BootEntry};
use crate::bus::{MmioBus, PioBus};
use crate::cpuid::{MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE};
use crate::event::Event;
use crate::layout;

/// Errors from vCPU set-up, save and restore.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} MSRs (first refused: {first:#x})")]
    Msrs {
        id: u8,
        set: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {id}: saved state is invalid: {reason}")]
    BadState { id: u8, reason: String },
    #[error("vCPU {0} is running; pause it first")]
    NotPaused(u8),
}

/// The complete architectural state of a vCPU, as KVM exposes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// A vCPU and the MSR list its state is made of.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    msr_list: Arc<Vec<u32>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
    let mut limit = (descriptor & 0xffff) | (((descriptor >> 48) & 0xf) << 16);
    let g = ((descriptor >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Flat 32-bit protected-mode descriptors for PVH and Multiboot entry.
const PROTECTED_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_0067,
];

impl Vcpu {
    /// Wrap a created vCPU and give it its CPUID table.
    pub fn new(
        id: u8,
        fd: VcpuFd,
        cpuid: &CpuId,
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        fd.set_cpuid2(cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        Ok(Vcpu { id, fd, msr_list })
    }

    /// Put the vCPU in its power-on state: the boot vCPU at the kernel's entry, the others
    /// waiting for INIT/SIPI.
    pub fn configure(&self, entry: BootEntry) -> Result<(), VcpuError> {
        let id = self.id;
        // Interrupt pins: LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
        let mut lapic = self.fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        set_lint(&mut lapic, 0x350, 7);
        set_lint(&mut lapic, 0x360, 4);
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;
        let boot_msrs = [
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: 1,
                ..Default::default()
            }, // fast strings
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: (1 << 11) | 6,
                ..Default::default()
            }, // MTRRs on, WB
        ];
        let msrs = Msrs::from_entries(&boot_msrs).map_err(|_| VcpuError::BadState {
            id,
            reason: "MSR table".into(),
        })?;
        self.fd
            .set_msrs(&msrs)
            .map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if id != 0 {
            let mp = kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            };
            return self
                .fd
                .set_mp_state(mp)
                .map_err(kvm_err(id, "KVM_SET_MP_STATE"));
        }

        let mut sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match entry {
            BootEntry::Pvh { entry: rip } | BootEntry::Multiboot { entry: rip } => {
                let code = segment(0x8, PROTECTED_GDT[1]);
                let data = segment(0x10, PROTECTED_GDT[2]);
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.tr = segment(0x18, PROTECTED_GDT[3]);
                sregs.cr0 = 0x11; // PE | ET
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = rip;
                if let BootEntry::Multiboot { .. } = entry {
                    regs.rax = u64::from(boot::multiboot_eax());
                    regs.rbx = layout::MB_INFO_START;
                } else {
                    regs.rbx = layout::PVH_INFO_START;
                }
            }
            BootEntry::Linux64 { entry } => {
                let code = segment(0x8, boot::BOOT_GDT[1]);
                let data = segment(0x10, boot::BOOT_GDT[2]);
                sregs.gdt.base = layout::BOOT_GDT_START;
                sregs.gdt.limit = (boot::BOOT_GDT.len() * 8 - 1) as u16;
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.tr = segment(0x18, boot::BOOT_GDT[3]);
                sregs.cr3 = layout::PML4_START;
                sregs.cr4 = 0x20; // PAE
                sregs.cr0 = 0x8000_0011; // PG | ET | PE
                sregs.efer = 0x500; // LME | LMA
                regs.rip = entry;
                regs.rsi = layout::ZERO_PAGE_START;
                regs.rsp = layout::BOOT_STACK_POINTER;
                regs.rbp = layout::BOOT_STACK_POINTER;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))
    }
}

fn set_lint(lapic: &mut kvm_lapic_state, reg: usize, delivery_mode: u32) {
    let mut b = [0u8; 4];
    for (i, v) in lapic.regs[reg..reg + 4].iter().enumerate() {
        b[i] = *v as u8;
    }
    let v = u32::from_le_bytes(b);
    let v = (v & !0x700) | (delivery_mode << 8);
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *byte as _;
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    /// The created vCPU fd, its id and the MSR list of this host.
    type ConstructorArgs = (u8, VcpuFd, Arc<Vec<u32>>);
    type Error = VcpuError;

    /// The order follows what KVM needs to give a consistent picture: MP state and
    /// registers first, LAPIC before MSRs (TSC deadline), events last.
    fn save(&self) -> Result<VcpuState, VcpuError> {
        let (id, fd) = (self.id, &self.fd);
        let mp_state = fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
        let debug_regs = fd
            .get_debug_regs()
            .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(id, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let mut msrs = Vec::with_capacity(self.msr_list.len());
        for chunk in self.msr_list.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = Msrs::from_entries(&entries).map_err(|_| VcpuError::BadState {
                id,
                reason: "MSR table".into(),
            })?;
            let n = fd.get_msrs(&mut m).map_err(kvm_err(id, "KVM_GET_MSRS"))?;
            if n != entries.len() {
                return Err(VcpuError::Msrs {
                    id,
                    set: n,
                    total: entries.len(),
                    first: entries[n].index,
                });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        let events = fd
            .get_vcpu_events()
            .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    fn restore(
        (id, fd, msr_list): Self::ConstructorArgs,
        s: &VcpuState,
    ) -> Result<Self, VcpuError> {
        if s.id != id {
            return Err(VcpuError::BadState {
                id,
                reason: format!("state belongs to vCPU {}", s.id),
            });
        }
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::BadState {
            id,
            reason: "CPUID table too large".into(),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        if let Some(khz) = s.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // Not every host can scale the TSC; a guest calibrated at another frequency
                // would see its clock drift, so say so rather than fail.
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::warn!("vCPU {id}: cannot set TSC to {khz} kHz: {e}");
                }
            }
        }
        fd.set_mp_state(s.mp_state)
            .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        // SAFETY: `s.xsave` is a complete `kvm_xsave` (the legacy 4 KiB layout that
        // KVM_GET_XSAVE produced), which is exactly what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debug_regs)
            .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        for chunk in s.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let m = Msrs::from_entries(chunk).map_err(|_| VcpuError::BadState {
                id,
                reason: "MSR table".into(),
            })?;
            let n = fd.set_msrs(&m).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(VcpuError::Msrs {
                    id,
                    set: n,
                    total: chunk.len(),
                    first: chunk[n].index,
                });
            }
        }
        fd.set_vcpu_events(&s.events)
            .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(Vcpu { id, fd, msr_list })
    }
}

/// Commands to a vCPU thread.
pub enum VcpuCmd {
    /// Leave KVM_RUN and wait; answered with [`VcpuAck::Paused`].
    Pause,
    /// Run again; answered with [`VcpuAck::Resumed`].
    Resume,
    /// Save the state of a paused vCPU.
    Save(Sender<Result<VcpuState, VcpuError>>),
    /// End the thread.
    Exit,
}

/// A vCPU thread's answer to Pause / Resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    Paused,
    Resumed,
}

/// What a vCPU thread tells the VMM without being asked.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest asked to power off or reset.
    Action(u8, VmAction),
    /// KVM failed or the guest hit something ferry cannot emulate.
    Failed(u8, String),
}

/// Signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte, for the kick handler.
    static IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A kick that lands just before KVM_RUN would be lost; setting immediate_exit makes that
    // KVM_RUN return at once instead (the KVM API's recipe). In KVM_RUN, the signal alone
    // makes it return with EINTR.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points into this thread's kvm_run mapping, set by the vCPU thread that
        // owns it for as long as the thread runs; a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

struct ForgetImmediateExit;

impl Drop for ForgetImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Install the handler for [`kick_signal`] once per process: it makes KVM_RUN return with
/// EINTR, or right away if the kick came just before it.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| e.errno())
    })
    .map_err(std::io::Error::from_raw_os_error)
}

/// Rate limit for messages a guest can trigger.
struct Ratelimit(u32);

impl Ratelimit {
    fn allow(&mut self) -> bool {
        self.0 += 1;
        self.0 <= 10 || self.0.is_power_of_two()
    }
}

fn log_exit(vcpu: &Vcpu) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let regs = vcpu
            .fd
            .get_regs()
            .map(|r| format!("rip={:#x} rsp={:#x}", r.rip, r.rsp));
        let sregs = vcpu.fd.get_sregs().map(|s| {
            format!(
                "cs={:#x} cr0={:#x} efer={:#x}",
                s.cs.selector, s.cr0, s.efer
            )
        });
        let mp = vcpu.fd.get_mp_state().map(|m| m.mp_state);
        tracing::debug!("vCPU {} ends: {regs:?} {sregs:?} mp_state={mp:?}", vcpu.id);
    }
}

/// The period of vCPU throttling (auto-converge): a throttled vCPU sleeps its share of it.
pub const THROTTLE_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// What a vCPU thread is connected to.
pub struct VcpuLinks {
    pub bus: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    /// Percent of its time to give up (auto-converge during a migration).
    pub throttle: Arc<std::sync::atomic::AtomicU32>,
    pub cmds: Receiver<VcpuCmd>,
    pub acks: Sender<VcpuAck>,
    pub events: Sender<Event>,
}

/// The body of a vCPU thread.
pub fn run_thread(mut vcpu: Vcpu, links: VcpuLinks, start_paused: bool) {
    let VcpuLinks {
        bus,
        mmio,
        throttle,
        cmds,
        acks,
        events,
    } = links;
    let id = vcpu.id;
    let immediate_exit: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    // Dropped before `vcpu` (locals go before parameters): no kick may write into a kvm_run
    // mapping that is gone.
    let _forget = ForgetImmediateExit;
    let mut running = !start_paused;
    let mut stopped = false;
    let mut unhandled = Ratelimit(0);
    let mut next_throttle: Option<std::time::Instant> = None;
    loop {
        if !running {
            match cmds.recv() {
                Ok(VcpuCmd::Pause) => {
                    let _ = acks.send(VcpuAck::Paused);
                }
                Ok(VcpuCmd::Resume) => {
                    running = !stopped;
                    let _ = acks.send(VcpuAck::Resumed);
                }
                Ok(VcpuCmd::Save(reply)) => {
                    let _ = reply.send(vcpu.save());
                }
                Ok(VcpuCmd::Exit) | Err(_) => return log_exit(&vcpu),
            }
            continue;
        }
        match cmds.try_recv() {
            Ok(VcpuCmd::Pause) => {
                running = false;
                let _ = acks.send(VcpuAck::Paused);
                continue;
            }
            Ok(VcpuCmd::Resume) => {
                let _ = acks.send(VcpuAck::Resumed);
            }
            Ok(VcpuCmd::Save(reply)) => {
                let _ = reply.send(Err(VcpuError::NotPaused(id)));
            }
            Ok(VcpuCmd::Exit) | Err(TryRecvError::Disconnected) => return log_exit(&vcpu),
            Err(TryRecvError::Empty) => {}
        }
        let stop = |action: Option<VmAction>, msg: Option<String>| -> VcpuEvent {
            match (action, msg) {
                (Some(a), _) => VcpuEvent::Action(id, a),
                (None, m) => VcpuEvent::Failed(id, m.unwrap_or_default()),
            }
        };
        // Auto-converge: while a migration asks for it, give up `throttle`% of every period.
        let pct = throttle.load(std::sync::atomic::Ordering::Relaxed);
        if pct > 0 && next_throttle.is_none_or(|t| std::time::Instant::now() >= t) {
            // Sleep in short slices: the switch-over lifts the throttle and pauses at once.
            let until = std::time::Instant::now() + THROTTLE_PERIOD * pct.min(95) / 100;
            while std::time::Instant::now() < until
                && throttle.load(std::sync::atomic::Ordering::Relaxed) > 0
            {
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            next_throttle =
                Some(std::time::Instant::now() + THROTTLE_PERIOD * (100 - pct.min(95)) / 100);
        }
        let outcome = match vcpu.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data).map(|a| stop(Some(a), None)),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    if unhandled.allow() {
                        tracing::debug!("vCPU {id}: read of unmapped MMIO {addr:#x}");
                    }
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) && unhandled.allow() {
                    tracing::debug!("vCPU {id}: write to unmapped MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(stop(Some(VmAction::Reset), None)), // triple fault
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                Some(stop(Some(VmAction::PowerOff), None))
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                Some(stop(Some(VmAction::Reset), None))
            }
            Ok(VcpuExit::Hlt) => Some(stop(Some(VmAction::PowerOff), None)),
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(stop(
                None,
                Some(format!(
                    "KVM entry failed (reason {reason:#x}, host cpu {cpu})"
                )),
            )),
            Ok(VcpuExit::InternalError) => {
                let regs = vcpu
                    .fd
                    .get_regs()
                    .map(|r| format!("rip={:#x}", r.rip))
                    .unwrap_or_default();
                Some(stop(
                    None,
                    Some(format!("KVM internal error (emulation failure?) {regs}")),
                ))
            }
            Ok(other) => Some(stop(None, Some(format!("unexpected vCPU exit {other:?}")))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(stop(None, Some(format!("KVM_RUN failed: {e}")))),
        };
        if let Some(ev) = outcome {
            running = false;
            stopped = true;
            let _ = events.send(Event::Vcpu(ev));
        }
    }
}
