//! The command line: one subcommand per job; each module owns its `Args` and its `run`.

use crate::error::{code, Error, Result};
use crate::interp::config::{self, ProcessEnv};
use crate::interp::exec::{self, RealProbe};
use crate::interp::plan::{self, Request, Strategy};
use crate::interp::{self, elf};
use crate::logging;
use clap::{Parser, Subcommand};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "nixqimg",
    version,
    about = "Run foreign programs under qemu-user through binfmt_misc, and build NixOS cloud images without a VM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a foreign program the way the binfmt interpreter would (for debugging).
    Exec(ExecArgs),
    /// Register nixqimg in binfmt_misc for foreign systems.
    Register(crate::binfmt::RegisterArgs),
    /// Remove nixqimg's binfmt_misc entries.
    Unregister(crate::binfmt::UnregisterArgs),
    /// Show every binfmt_misc registration and what serves each system.
    Status(crate::binfmt::StatusArgs),
    /// Run a command in a private user+mount namespace with its own binfmt_misc holding nixqimg.
    Ns(crate::binfmt::ns::Args),
    /// Explain why foreign programs or builds fail here, and name the fix.
    Doctor(crate::doctor::Args),
    /// Print the Nix settings (extra-platforms, extra-sandbox-paths) nixqimg needs.
    NixConfig(crate::nix::NixConfigArgs),
    /// Build a NixOS image with Nix, for one or more systems.
    Build(crate::nix::BuildArgs),
    /// Assemble a bootable disk image from a NixOS system closure, without a VM.
    Image(crate::image::Args),
    /// Make a NoCloud seed volume for cloud-init.
    Seed(crate::image::seed::Args),
    /// Boot an image in QEMU.
    Run(crate::vm::run::Args),
    /// Write an image onto a disk or file.
    Write(crate::vm::write::Args),
    /// Keep the BIOS loader's configuration in step with systemd-boot's entries.
    Bootloader(crate::image::bootloader::Args),
    /// One HTTP connection of `run --metadata` on stdin/stdout (QEMU's guestfwd starts it).
    #[command(name = "__metadata", hide = true)]
    Metadata { spec: String, log: Option<PathBuf> },
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    #[arg(long, default_value = "auto", value_parser = parse_strategy)]
    strategy: Strategy,
    /// Print the argv nixqimg would exec and the facts that chose it, then exit.
    #[arg(long)]
    explain: bool,
    /// The foreign program.
    #[arg(required = true)]
    binary: PathBuf,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

fn parse_strategy(s: &str) -> std::result::Result<Strategy, String> {
    s.parse().map_err(|_| format!("'{s}' is not auto, direct or loader-first"))
}

/// Parses and runs one command; returns the process exit code.
pub fn main(args: Vec<OsString>) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { code::USAGE } else { 0 };
        }
    };
    let _log = logging::init(std::env::var("NIXQIMG_LOG").ok().as_deref(), None);
    let res = match cli.cmd {
        Cmd::Exec(a) => exec_cmd(a),
        Cmd::Register(a) => crate::binfmt::run_register(a),
        Cmd::Unregister(a) => crate::binfmt::run_unregister(a),
        Cmd::Status(a) => crate::binfmt::run_status(a),
        Cmd::Ns(a) => crate::binfmt::ns::run(a),
        Cmd::Doctor(a) => crate::doctor::run(a),
        Cmd::NixConfig(a) => crate::nix::run_nix_config(a),
        Cmd::Build(a) => crate::nix::run_build(a),
        Cmd::Image(a) => crate::image::run(a),
        Cmd::Seed(a) => crate::image::seed::run(a),
        Cmd::Run(a) => crate::vm::run::run(a),
        Cmd::Write(a) => crate::vm::write::run(a),
        Cmd::Bootloader(a) => crate::image::bootloader::run(a),
        Cmd::Metadata { spec, log } => {
            crate::vm::metadata::serve(&spec, log.as_deref(), std::io::stdin().lock(), std::io::stdout().lock())
        }
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "nixqimg: {e}");
            e.code
        }
    }
}

fn exec_cmd(a: ExecArgs) -> Result<()> {
    let self_exe = std::fs::read_link("/proc/self/exe").ok();
    let mut cfg = config::load(self_exe.as_deref(), &ProcessEnv, false);
    if a.strategy != Strategy::Auto {
        cfg.strategy = a.strategy;
    }
    let shown = a.binary.display().to_string();
    let file = std::fs::File::open(&a.binary).map_err(|e| {
        Error::new(format!("{shown}: cannot open: {e}")).code(if e.kind() == std::io::ErrorKind::NotFound {
            code::NOT_FOUND
        } else {
            code::CANNOT_EXEC
        })
    })?;
    let facts = elf::read(&file).map_err(|e| Error::new(format!("{shown}: {e}")).code(code::CANNOT_EXEC))?;
    let qemu = interp::find_qemu(&cfg, facts.arch, &RealProbe).ok_or_else(|| {
        Error::new(format!("{shown}: no qemu-{} found", facts.arch.qemu))
            .hint("install qemu-user-static or set NIXQIMG_QEMU_DIR")
            .code(code::NOT_FOUND)
    })?;
    let env = interp::environ();
    let env: Vec<&OsStr> = env.iter().map(|e| e.as_os_str()).collect();
    let args: Vec<&OsStr> = a.args.iter().map(|a| a.as_os_str()).collect();
    let req = Request {
        program: a.binary.as_os_str(),
        path: a.binary.as_os_str(),
        argv0: a.binary.as_os_str(),
        args: &args,
        env: &env,
        facts: &facts,
        qemu,
        strategy: cfg.strategy,
        sysroots: &cfg.sysroots,
        page_size: exec::page_size(),
        secure: false,
        explain: true,
    };
    let plan = plan::plan(&req, &RealProbe).map_err(|e| Error::new(format!("{shown}: {e}")).code(code::NOT_FOUND))?;
    if a.explain {
        let mut out = String::new();
        for w in cfg.warnings.iter().chain(plan.why.iter()) {
            out.push_str("# ");
            out.push_str(w);
            out.push('\n');
        }
        let line: Vec<String> = plan.argv.iter().map(|s| crate::util::shell_quote(s)).collect();
        out.push_str(&line.join(" "));
        out.push('\n');
        let _ = std::io::stdout().write_all(out.as_bytes());
        return Ok(());
    }
    let e = exec::exec(&plan);
    Err(Error::new(format!("{shown}: cannot exec {}: {e}", plan.exe.display())).code(code::CANNOT_EXEC))
}
