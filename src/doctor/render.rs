//! doctor's report for people: the host, each binary, the findings. The JSON is the structs themselves.

use super::*;
use std::fmt::Write as _;

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let h = &r.host;
    let _ = writeln!(o, "host: {} kernel {}, page size {}", h.arch, h.kernel, h.page_size);
    if h.assumed_page_size != h.page_size {
        let _ = writeln!(o, "predicting for page size {} (--page-size)", h.assumed_page_size);
    }
    if let Some(m) = h.mmap_min_addr {
        let _ = writeln!(o, "vm.mmap_min_addr: {m:#x}");
    }
    let _ = writeln!(
        o,
        "binfmt_misc: {}",
        match (h.binfmt_misc.mounted, h.binfmt_misc.enabled) {
            (false, _) => "not mounted",
            (true, false) => "mounted, disabled",
            (true, true) => "mounted, enabled",
        }
    );
    let natives: Vec<String> = h.native.iter().map(|n| format!("{} ({})", n.system, n.how)).collect();
    let _ = writeln!(o, "native: {}", natives.join(", "));
    for s in h.systems.iter().filter(|s| s.served_by.is_some()) {
        let _ = writeln!(
            o,
            "{}: {} [{}] -> {}{}; qemu {}",
            s.system,
            s.served_by.as_deref().unwrap_or("-"),
            s.flags.as_deref().unwrap_or(""),
            s.interpreter.as_deref().unwrap_or("-"),
            if s.interpreter_exists { "" } else { " (missing)" },
            match (&s.qemu, &s.qemu_version) {
                (Some(q), Some(v)) => format!("{q} ({v})"),
                (Some(q), None) => q.clone(),
                (None, _) => "not found".into(),
            }
        );
    }
    match &h.nix {
        Some(n) => {
            let _ = writeln!(
                o,
                "nix {}: system {}, sandbox {}, extra-platforms [{}], sandbox-paths [{}]",
                n.version,
                n.system,
                n.sandbox,
                n.extra_platforms.join(" "),
                n.sandbox_paths.join(" ")
            );
            for b in &n.builders {
                let answer = if b.answers {
                    "answers".to_string()
                } else {
                    format!("does not answer: {}", b.error.as_deref().unwrap_or("no answer"))
                };
                let _ = writeln!(o, "builder {}: {} (max-jobs {}), {answer}", b.uri, b.systems.join(","), b.max_jobs);
            }
        }
        None => {
            let _ = writeln!(o, "nix: not found");
        }
    }
    for b in &r.binaries {
        binary(&mut o, b);
    }
    let _ = writeln!(o);
    if r.findings.iter().all(|f| f.severity == "info") {
        let _ = writeln!(o, "no problems found");
    }
    for f in &r.findings {
        let _ = write!(o, "{}: {}: {}", f.severity, f.subject, f.what);
        if let Some(fix) = &f.fix {
            let _ = write!(o, "\n  fix: {fix}");
        }
        let _ = writeln!(o);
    }
    o
}

/// One binary's facts, plan and tries.
fn binary(o: &mut String, b: &Binary) {
    let _ = writeln!(o, "\n{}:", b.path);
    if let Some(e) = &b.error {
        let _ = writeln!(o, "  error: {e}");
        return;
    }
    let _ = writeln!(
        o,
        "  {} {}, {}",
        b.system.unwrap_or("?"),
        b.elf_type.unwrap_or("?"),
        match (&b.interp, b.interp_exists) {
            (Some(i), Some(true)) => format!("loader {i}"),
            (Some(i), _) => format!("loader {i} (not on this host)"),
            (None, _) => "static".into(),
        }
    );
    if let Some(rp) = &b.runpath {
        let _ = writeln!(o, "  {}: {rp}", b.runpath_kind.unwrap_or("RUNPATH"));
    }
    if !b.needed.is_empty() {
        let _ = writeln!(o, "  needs: {}", b.needed.join(" "));
    }
    if let Some(lo) = &b.lowest_load {
        let _ = writeln!(o, "  lowest load: {lo}");
    }
    if let Some(g) = &b.guest_base {
        let per: Vec<String> =
            g.by_page_size.iter().map(|(p, r)| format!("{p}: {}", if *r { "fails" } else { "ok" })).collect();
        let _ = writeln!(
            o,
            "  guest_base run directly: {} on {}-byte pages ({})",
            if g.risk { "FAILS" } else { "ok" },
            g.page_size,
            per.join(", ")
        );
    }
    if b.native {
        let _ = writeln!(o, "  native: runs without qemu");
    }
    let _ = writeln!(o, "  binfmt entry: {}", b.binfmt_entry.as_deref().unwrap_or("none"));
    if let Some(p) = &b.plan {
        match (&p.error, p.mode) {
            (Some(e), _) => {
                let _ = writeln!(o, "  plan: cannot run: {e}");
            }
            (None, Some(m)) => {
                let _ = writeln!(o, "  plan: {m}: {}", p.argv.join(" "));
                for w in &p.why {
                    let _ = writeln!(o, "    # {w}");
                }
            }
            _ => {}
        }
    }
    for t in &b.tries {
        let _ = writeln!(o, "  try {}: {}", t.strategy, t.outcome());
        for (tag, text) in [("stdout", &t.stdout), ("stderr", &t.stderr)] {
            for l in text.lines().take(10) {
                let _ = writeln!(o, "    {tag}: {l}");
            }
        }
    }
}
