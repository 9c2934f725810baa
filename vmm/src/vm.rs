//! Assembles a VM (memory, irqchip, buses, devices, boot state, vCPUs) and runs it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{create_acpi_tables, AcpiError};
use crate::arch::boot_params::{write_pvh_start_info, write_zero_page, BootParamsError};
use crate::arch::cpuid::{host_is_pvm, CpuidError, CpuidTemplate};
use crate::arch::layout::*;
use crate::arch::regs::{self, EntryMode, RegsError};
use crate::bus::{Bus, BusError};
use crate::config::{ConsoleConfig, VmConfig};
use crate::console_log::{ConsoleLog, ConsoleLogError};
use crate::control::{eject_notifier, ControlHandle, ControlMessage, Controller};
use crate::device_manager::{DeviceError, DeviceManager, DeviceManagerParts, MAX_SLOT};
use crate::devices::legacy::acpi_pm::AcpiPmDevice;
use crate::devices::legacy::cmos::{self, Cmos, MemorySizes, SystemClock};
use crate::devices::legacy::debug_port::{BootProgress, DebugPort};
use crate::devices::legacy::ged::{self, Ged, GedNotifier};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::pvpanic::PvPanic;
use crate::devices::legacy::serial::{ConsoleWriter, SerialDevice};
use crate::devices::legacy::{EventFdTrigger, IrqLine};
use crate::devices::pci::host_bridge::HostBridge;
use crate::devices::pci::hotplug::{self, PciHotplug};
use crate::devices::pci::msix::MsixError;
use crate::devices::pci::root::PciRootError;
use crate::devices::pci::{PciConfigIo, PciConfigMmio, PciRoot};
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::transport::pci::VirtioPciError;
use crate::exit::{ExitReason, ExitSignal};
use crate::interrupts::{GsiRouter, InterruptError};
use crate::loader::{self, LoaderError};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vcpu::{install_kick_handler, stop_vcpus, RunControl, Vcpu};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM supports at most {max} vCPUs, {requested} were requested")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] PciRootError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Console(#[from] ConsoleLogError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("guest code of {len} bytes does not fit at {addr:#x}")]
    GuestCode { addr: u64, len: usize },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// What the boot vCPU starts: a Linux kernel, or raw code (for the project's test guests).
pub enum BootSource {
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    Code {
        code: Vec<u8>,
        load_addr: u64,
        mode: EntryMode,
    },
}

pub struct VmResources {
    pub boot: BootSource,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub console: Box<dyn Write + Send>,
    /// Forward the VMM's terminal input to the serial port.
    pub console_input: bool,
    /// PCI slots kept free for hot-plugged devices.
    pub pci_slots: u8,
}

impl VmResources {
    pub fn from_config(config: &VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let (console, console_input): (Box<dyn Write + Send>, bool) = match &config.console {
            ConsoleConfig::Stdout => (Box::new(std::io::stdout()), true),
            ConsoleConfig::Off => (Box::new(std::io::sink()), false),
            ConsoleConfig::File(file) => {
                let log = ConsoleLog::open(&file.path, file.max_bytes)?;
                (Box::new(log), false)
            }
        };
        Ok(VmResources {
            boot: BootSource::Kernel {
                kernel: config.kernel.clone(),
                initrd: config.initrd.clone(),
                cmdline: config.cmdline.clone(),
            },
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            disks: config.disks.clone(),
            nets: config.nets.clone(),
            console,
            console_input,
            pci_slots: config.pci_slots,
        })
    }
}

pub struct Vm {
    // Field order matters for drop: vCPUs and devices go before the VM fd and memory.
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    /// Until `run` hands it to the control thread.
    devices: Option<DeviceManager>,
    exit: ExitSignal,
    progress: BootProgress,
    console_input: bool,
    run_control: Arc<RunControl>,
    ged: GedNotifier,
    control_tx: mpsc::Sender<ControlMessage>,
    control_rx: mpsc::Receiver<ControlMessage>,
    _router: GsiRouter,
    _vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    _kvm: Kvm,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A VM that never ran still takes its devices down in order.
        if let Some(devices) = self.devices.as_mut() {
            devices.shut_down();
        }
    }
}

impl Vm {
    /// Builds the VM. `start` is when the VMM process started (for boot milestones).
    pub fn build(resources: VmResources, start: Instant) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max_vcpus = kvm.get_max_vcpus();
        if resources.cpus == 0 || resources.cpus as usize > max_vcpus {
            return Err(VmError::TooManyVcpus {
                requested: resources.cpus,
                max: max_vcpus,
            });
        }
        let mem = memory::create_guest_memory(resources.memory_mib)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the interrupt controllers"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the PIT"))?;
        memory::register_with_kvm(&vm, &mem)?;
        // KVM_CREATE_IRQCHIP already installed the legacy routes; the first MSI-X route
        // rewrites them along with it. (A routing update waits for an RCU grace period:
        // milliseconds that start-up need not spend.)
        let router = GsiRouter::new(vm.clone());

        let exit = ExitSignal::new();
        let run_control = Arc::new(RunControl::default());
        let progress = BootProgress::new(start);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create the serial interrupt"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ_COM1)
            .map_err(kvm_err("bind the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(serial_irq),
            ConsoleWriter::new(resources.console, exit.clone()),
        )));
        pio.insert(serial.clone(), u64::from(SERIAL_PORT_COM1), 8)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            u64::from(I8042_PORT),
            5,
        )?;
        pio.insert(
            Arc::new(Mutex::new(DebugPort::new(progress.clone()))),
            u64::from(DEBUG_PORT),
            1,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone()))),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            AcpiPmDevice::LEN,
        )?;
        let ram = resources.memory_mib << 20;
        let rtc = Cmos::new(
            MemorySizes {
                below_4g: ram.min(MMIO32_HOLE_START),
                above_4g: ram.saturating_sub(MMIO32_HOLE_START),
            },
            Box::new(IrqLine::new(vm.clone(), cmos::IRQ)),
            Box::new(SystemClock),
        )
        .map_err(io_err("start the RTC timer thread"))?;
        pio.insert(
            Arc::new(Mutex::new(rtc)),
            u64::from(cmos::INDEX_PORT),
            cmos::PORTS,
        )?;
        pio.insert(
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
            u64::from(PVPANIC_PORT),
            1,
        )?;

        let (control_tx, control_rx) = mpsc::channel();
        let (ged, ged_notifier) = Ged::new(Box::new(IrqLine::new(vm.clone(), GED_IRQ)));
        pio.insert(Arc::new(Mutex::new(ged)), u64::from(GED_PORT), ged::LEN)?;
        let (hotplug, hotplug_slots) =
            PciHotplug::new(Box::new(eject_notifier(control_tx.clone())));
        pio.insert(
            Arc::new(Mutex::new(hotplug)),
            u64::from(PCI_HOTPLUG_PORT),
            hotplug::LEN,
        )?;

        let pci_root = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
        pci_root
            .lock()
            .expect("PCI root lock poisoned")
            .add_device(Arc::new(Mutex::new(HostBridge::new())), None)?;
        let boot_devices = resources.disks.len() + resources.nets.len();
        let last_slot =
            (boot_devices + usize::from(resources.pci_slots)).min(usize::from(MAX_SLOT)) as u8;
        let mut devices = DeviceManager::new(DeviceManagerParts {
            pci_root: pci_root.clone(),
            router: router.clone(),
            mem: mem.clone(),
            vm: vm.clone(),
            queues_per_disk: u16::from(resources.cpus),
            last_slot,
            hotplug: hotplug_slots,
            ged: ged_notifier.clone(),
        });
        for disk in resources.disks {
            devices.add_disk(disk, false)?;
        }
        for net in resources.nets {
            devices.add_net(net, None, false)?;
        }
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci_root.clone()))),
            u64::from(PCI_CONFIG_ADDRESS_PORT),
            PciConfigIo::LEN,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci_root.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )?;

        let rsdp = create_acpi_tables(&mem, resources.cpus, last_slot)?;
        let (entry, mode, boot_info) = match resources.boot {
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let loaded = loader::load_kernel(&mem, &kernel)?;
                let initrd = initrd
                    .map(|path| {
                        loader::load_initrd(
                            &mem,
                            &path,
                            loaded.kernel_end,
                            loaded.setup_header.as_ref(),
                        )
                    })
                    .transpose()?;
                let cmdline_len = loader::write_cmdline(&mem, &cmdline)?;
                let boot_info = match loaded.mode {
                    EntryMode::Protected32 => write_pvh_start_info(&mem, initrd.as_ref(), rsdp)?,
                    _ => {
                        write_zero_page(
                            &mem,
                            loaded.setup_header,
                            cmdline_len,
                            initrd.as_ref(),
                            rsdp,
                        )?;
                        ZERO_PAGE_START
                    }
                };
                tracing::info!(
                    "kernel {} ({:?}) entry {:#x} via {:?}",
                    kernel.display(),
                    loaded.format,
                    loaded.entry,
                    loaded.mode
                );
                (loaded.entry, loaded.mode, boot_info)
            }
            BootSource::Code {
                code,
                load_addr,
                mode,
            } => {
                mem.write_slice(&code, GuestAddress(load_addr))
                    .map_err(|_| VmError::GuestCode {
                        addr: load_addr,
                        len: code.len(),
                    })?;
                (load_addr, mode, 0)
            }
        };

        let cpuid = CpuidTemplate::new(&kvm, resources.cpus, host_is_pvm())?;
        let mut vcpus = Vec::with_capacity(resources.cpus as usize);
        for id in 0..resources.cpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            fd.set_cpuid2(&cpuid.for_vcpu(id))
                .map_err(kvm_err("set CPUID"))?;
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            if id == 0 {
                regs::setup_sregs(&mem, &fd, mode)?;
                regs::setup_regs(&fd, mode, entry, boot_info)?;
            }
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                run_control: run_control.clone(),
            });
        }

        Ok(Vm {
            vcpus,
            serial,
            devices: Some(devices),
            exit,
            progress,
            console_input: resources.console_input,
            run_control,
            ged: ged_notifier,
            control_tx,
            control_rx,
            _router: router,
            _vm: vm,
            mem,
            _kvm: kvm,
        })
    }

    pub fn boot_progress(&self) -> BootProgress {
        self.progress.clone()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn exit_signal(&self) -> ExitSignal {
        self.exit.clone()
    }

    /// The handle the API (or a test) changes the running VM with.
    pub fn control(&self) -> ControlHandle {
        ControlHandle::new(self.control_tx.clone())
    }

    /// Runs the guest until it stops; returns why. The calling thread becomes the
    /// control thread that serves `control()` requests meanwhile.
    pub fn run(mut self) -> ExitReason {
        if let Err(e) = install_kick_handler() {
            return ExitReason::VmmError(format!("cannot install the vCPU kick handler: {e}"));
        }
        let mut handles = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            match vcpu.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.exit.request(ExitReason::VmmError(format!(
                        "cannot start a vCPU thread: {e}"
                    )));
                    break;
                }
            }
        }
        if self.console_input {
            spawn_console_input(self.serial.clone(), self.exit.clone());
        }
        let wake = Mutex::new(self.control_tx.clone());
        self.exit.set_waker(move || {
            let tx = wake.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(ControlMessage::Wake);
        });
        let Some(devices) = self.devices.take() else {
            return ExitReason::VmmError("the VM was already run".into());
        };
        let mut controller = Controller::new(
            devices,
            self.run_control.clone(),
            handles,
            self.ged.clone(),
            self.exit.clone(),
        );
        let (_, rx) = mpsc::channel();
        let rx = std::mem::replace(&mut self.control_rx, rx);
        controller.serve(rx);
        stop_vcpus(controller.release_vcpus());
        // vCPUs first, then the devices: workers drained and joined, disks flushed.
        controller.devices.shut_down();
        self.exit.wait()
    }
}

/// Forwards terminal input to the serial port, for interactive use.
fn spawn_console_input(serial: Arc<Mutex<SerialDevice>>, exit: ExitSignal) {
    // SAFETY: isatty only inspects the file descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::confine_or_abort(crate::seccomp::ThreadKind::ConsoleIn);
            let mut buf = [0u8; 64];
            while !exit.is_requested() {
                let n = match std::io::Read::read(&mut std::io::stdin(), &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut sent = 0;
                while sent < n && !exit.is_requested() {
                    sent += serial
                        .lock()
                        .expect("serial lock poisoned")
                        .enqueue_input(&buf[sent..n]);
                    if sent < n {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
}
