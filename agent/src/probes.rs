//! Loading the probe object and attaching it: the one place that talks to aya about programs.

use std::{num::NonZeroU32, path::Path};

use allocwatch_common::{
    config, globals,
    go::{self, GO_SPECS_MAX, GoProc, GoSpec},
    libc::cookie,
    map_names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapError},
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use thiserror::Error;

use crate::{
    cli::CapacityArgs,
    target::{ProbePoint, go::GoProbe},
};

/// The compiled probe object, built by agent/build.rs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/allocwatch"));

const LIBC_ENTRY: &str = "libc_entry";
const LIBC_RETURN: &str = "libc_return";
const GO_ENTRY: &str = "go_entry";

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the kernel rejected the {program} program: {}", brief(error))]
    Program {
        program: &'static str,
        // Not a `#[source]`: its Display carries the whole verifier log.
        error: ProgramError,
    },
    #[error("cannot attach uprobes to {path}: {source}")]
    Attach { path: String, source: ProgramError },
    #[error("cannot configure the Go probes: {0}")]
    GoConfig(#[from] MapError),
    #[error("more than {GO_SPECS_MAX} Go functions probed at once")]
    TooManyGoSpecs,
}

/// Load-time settings of the probe.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// Only this process is traced; `None` traces every process the probes are attached to,
    /// narrowed by `filter`.
    pub tgid: Option<NonZeroU32>,
    pub filter: Filter,
    pub stacks: bool,
    pub capacity: CapacityArgs,
}

/// How the `TGIDS` map narrows tracing when no single process is targeted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Every process that runs a probed file.
    None,
    /// Only the processes the agent added.
    Allow,
    /// All but the processes the agent added (itself, exclusions).
    Deny,
}

/// The loaded probe object and its attachments; dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    filter: Filter,
    attached_points: usize,
    /// Next free slot of the GO_SPECS array.
    next_spec: u32,
}

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Self, ProbeError> {
        let tgid = cfg.tgid.map_or(0, NonZeroU32::get);
        let mut flags = if cfg.stacks { config::FLAG_STACKS } else { 0 };
        flags |= match cfg.filter {
            Filter::None => 0,
            Filter::Allow => config::FLAG_ALLOWLIST,
            Filter::Deny => config::FLAG_DENYLIST,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::FLAGS, &flags, true)
            .map_max_entries(map_names::LIVE, cfg.capacity.max_live)
            .map_max_entries(map_names::SITES, cfg.capacity.max_sites)
            .map_max_entries(map_names::STACKS, cfg.capacity.max_stacks)
            .map_max_entries(map_names::PENDING, cfg.capacity.max_pending)
            .load(PROBE_OBJECT)?;
        for program in [LIBC_ENTRY, LIBC_RETURN, GO_ENTRY] {
            uprobe(&mut ebpf, program)?
                .load()
                .map_err(|error| ProbeError::Program { program, error })?;
        }
        Ok(Self {
            ebpf,
            filter: cfg.filter,
            attached_points: 0,
            next_spec: 0,
        })
    }

    /// Attaches the entry program to every point of `file` and the return program to those that
    /// need the returned pointer. Scoped to `pid` when given (the kernel then only plants the
    /// breakpoints in that process).
    pub fn attach_libc(
        &mut self,
        file: &Path,
        points: &[ProbePoint],
        pid: Option<NonZeroU32>,
    ) -> Result<(), ProbeError> {
        let scope = pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let attach_err = |source| ProbeError::Attach {
            path: file.display().to_string(),
            source,
        };
        let entry: Vec<UProbeAttachPoint<'_>> = points.iter().map(attach_point).collect();
        let ret: Vec<UProbeAttachPoint<'_>> = points
            .iter()
            .filter(|p| p.with_return)
            .map(attach_point)
            .collect();
        uprobe(&mut self.ebpf, LIBC_ENTRY)?
            .attach(entry, file, scope)
            .map_err(attach_err)?;
        if !ret.is_empty() {
            uprobe(&mut self.ebpf, LIBC_RETURN)?
                .attach(ret, file, scope)
                .map_err(attach_err)?;
        }
        self.attached_points += points.len();
        Ok(())
    }

    /// Attaches the Go entry program at every probe site of a Go binary, each with its own
    /// capture spec.
    pub fn attach_go(
        &mut self,
        file: &Path,
        probes: &[GoProbe],
        pid: Option<NonZeroU32>,
    ) -> Result<(), ProbeError> {
        if probes.is_empty() {
            return Ok(());
        }
        let first = self.next_spec;
        let end = first
            .checked_add(probes.len() as u32)
            .filter(|&e| e <= GO_SPECS_MAX)
            .ok_or(ProbeError::TooManyGoSpecs)?;
        {
            let map = self
                .ebpf
                .map_mut(map_names::GO_SPECS)
                .ok_or(MapError::InvalidName {
                    name: map_names::GO_SPECS.into(),
                })?;
            let mut specs: Array<_, GoSpec> = Array::try_from(map)?;
            for (i, p) in probes.iter().enumerate() {
                specs.set(first + i as u32, &p.spec, 0)?;
            }
        }
        self.next_spec = end;
        for p in probes {
            log::debug!(
                "{} {:?}: offset {:#x}, sp delta {}, {}",
                p.symbol,
                p.role,
                p.file_offset,
                p.sp_delta,
                if p.emulated {
                    "emulated"
                } else {
                    "single-stepped"
                }
            );
        }
        let points: Vec<UProbeAttachPoint<'_>> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
                cookie: Some(go::cookie::encode(first + i as u32, p.sp_delta)),
            })
            .collect();
        let scope = pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        uprobe(&mut self.ebpf, GO_ENTRY)?
            .attach(points, file, scope)
            .map_err(|source| ProbeError::Attach {
                path: file.display().to_string(),
                source,
            })?;
        self.attached_points += probes.len();
        Ok(())
    }

    pub fn is_allowlist(&self) -> bool {
        self.filter == Filter::Allow
    }

    pub fn is_denylist(&self) -> bool {
        self.filter == Filter::Deny
    }

    /// Adds `tgid` to (or removes it from) the allow/denylist.
    pub fn set_listed(&mut self, tgid: u32, listed: bool) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(map_names::TGIDS)
            .ok_or(MapError::InvalidName {
                name: map_names::TGIDS.into(),
            })?;
        let mut tgids: HashMap<_, u32, u8> = HashMap::try_from(map)?;
        if listed {
            tgids.insert(&tgid, &1, 0)?;
        } else {
            match tgids.remove(&tgid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Tells the probe where `runtime.mallocgc` lives in process `tgid`.
    pub fn set_go_process(&mut self, tgid: u32, proc: GoProc) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut(map_names::GO_PROCS)
            .ok_or(MapError::InvalidName {
                name: map_names::GO_PROCS.into(),
            })?;
        let mut procs: HashMap<_, u32, GoProc> = HashMap::try_from(map)?;
        procs.insert(&tgid, &proc, 0)?;
        Ok(())
    }

    pub fn attached_points(&self) -> usize {
        self.attached_points
    }
}

/// One line for a load error: the verifier's log is hundreds of lines; its last statement says
/// why (the full log is for developers: `bpftool prog load` reproduces it).
fn brief(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let why = log
                .split(['\n', ';'])
                .map(str::trim)
                .rev()
                .find(|l| {
                    !l.is_empty()
                        && !l.starts_with("verification time")
                        && !l.starts_with("processed ")
                        && !l.starts_with("stack depth")
                })
                .unwrap_or("");
            let why: String = why.chars().take(200).collect();
            format!("{io_error}: {why}")
        }
        other => other.to_string(),
    }
}

fn attach_point(p: &ProbePoint) -> UProbeAttachPoint<'static> {
    UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(p.file_offset),
        cookie: Some(cookie::encode(p.api as u32, p.sp_delta)),
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    let missing = || ProbeError::Program {
        program,
        error: ProgramError::UnexpectedProgramType,
    };
    ebpf.program_mut(program)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|error| ProbeError::Program { program, error })
}
