//! Loading the probe object and attaching it: the one place that talks to aya about programs.

use std::{num::NonZeroU32, path::Path};

use allocwatch_common::{config, globals, libc::cookie, map_names};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use thiserror::Error;

use crate::{cli::CapacityArgs, target::ProbePoint};

/// The compiled probe object, built by agent/build.rs.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/allocwatch"));

const LIBC_ENTRY: &str = "libc_entry";
const LIBC_RETURN: &str = "libc_return";

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the kernel rejected the {program} program: {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error("cannot attach uprobes to {path}: {source}")]
    Attach { path: String, source: ProgramError },
}

/// Load-time settings of the probe.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// Only this process is traced; `None` traces every process the probes are attached to.
    pub tgid: Option<NonZeroU32>,
    pub stacks: bool,
    pub capacity: CapacityArgs,
}

/// The loaded probe object and its attachments; dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    attached_points: usize,
}

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Self, ProbeError> {
        let tgid = cfg.tgid.map_or(0, NonZeroU32::get);
        let flags = if cfg.stacks { config::FLAG_STACKS } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::FLAGS, &flags, true)
            .map_max_entries(map_names::LIVE, cfg.capacity.max_live)
            .map_max_entries(map_names::SITES, cfg.capacity.max_sites)
            .map_max_entries(map_names::STACKS, cfg.capacity.max_stacks)
            .map_max_entries(map_names::PENDING, cfg.capacity.max_pending)
            .load(PROBE_OBJECT)?;
        for program in [LIBC_ENTRY, LIBC_RETURN] {
            uprobe(&mut ebpf, program)?
                .load()
                .map_err(|source| ProbeError::Program { program, source })?;
        }
        Ok(Self {
            ebpf,
            attached_points: 0,
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

    pub fn attached_points(&self) -> usize {
        self.attached_points
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
        source: ProgramError::UnexpectedProgramType,
    };
    ebpf.program_mut(program)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|source| ProbeError::Program { program, source })
}
