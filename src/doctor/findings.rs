//! doctor's findings: every problem the facts show, each with its fix. Pure: facts in, findings out,
//! one function per kind of finding; the wording lives in the `Finding`s made here.

use super::*;

/// Every problem the facts show, each with its fix.
pub fn findings(h: &Host, bins: &[Binary]) -> Vec<Finding> {
    let mut out = Vec::new();
    // Systems that matter: those of the binaries given, else every system something serves.
    let wanted: Vec<&str> = if bins.is_empty() {
        h.systems.iter().filter(|s| s.served_by.is_some()).map(|s| s.system).collect()
    } else {
        let mut v: Vec<&str> = bins.iter().filter(|b| !b.native).filter_map(|b| b.system).collect();
        v.dedup();
        v
    };
    mount(h, bins.is_empty() && wanted.is_empty(), &mut out);
    for s in h.systems.iter().filter(|s| wanted.contains(&s.system)) {
        system(h, s, &mut out);
    }
    if let Some(n) = &h.nix {
        nix(h, n, &wanted, &mut out);
    }
    scope(h, &mut out);
    for b in bins {
        binary(b, &mut out);
    }
    out
}

/// binfmt_misc itself: mounted, enabled, serving anything.
fn mount(h: &Host, nothing_wanted: bool, out: &mut Vec<Finding>) {
    let m = &h.binfmt_misc;
    if !m.mounted {
        out.push(finding(
            "problem",
            "host",
            format!("binfmt_misc is not mounted at {}: the kernel cannot hand foreign programs to anyone", m.path),
            Some("nixqimg register --mount --all".into()),
        ));
    } else if !m.enabled {
        out.push(finding(
            "problem",
            "host",
            "binfmt_misc is disabled as a whole".into(),
            Some(format!("echo 1 > {}/status", m.path)),
        ));
    } else if nothing_wanted {
        out.push(finding(
            "problem",
            "host",
            "no foreign system is served: every foreign program fails with 'Exec format error'".into(),
            Some("nixqimg register --all (NixOS: nixqimg.binfmt.enable = true)".into()),
        ));
    }
}

/// One foreign system: who serves it and how.
fn system(h: &Host, s: &SystemFact, out: &mut Vec<Finding>) {
    let m = &h.binfmt_misc;
    let Some(by) = &s.served_by else {
        if m.mounted && m.enabled {
            out.push(finding(
                "problem",
                s.system,
                format!("no binfmt_misc entry serves {}: its programs fail with 'Exec format error'", s.system),
                Some(format!("nixqimg register {}", s.system)),
            ));
        }
        return;
    };
    let flags = s.flags.as_deref().unwrap_or("");
    if !s.interpreter_exists && !flags.contains('F') {
        out.push(finding(
            "problem",
            s.system,
            format!(
                "{by} names {} which does not exist (and without F it is looked up at each exec)",
                s.interpreter.as_deref().unwrap_or("?")
            ),
            Some(format!("nixqimg register --replace {}", s.system)),
        ));
    }
    if !s.served_by_nixqimg {
        out.push(finding(
            "warning",
            s.system,
            format!(
                "{by} (not nixqimg) serves {}: no loader-first fallback, so bootstrap-tools programs fail on 16K/64K-page hosts and where their loader is missing",
                s.system
            ),
            Some(format!("nixqimg register --replace {}", s.system)),
        ));
    }
    if !s.shadowed.is_empty() {
        out.push(finding(
            "info",
            s.system,
            format!("{} also match {}, but the kernel uses the newest entry, {by}", s.shadowed.join(", "), s.system),
            None,
        ));
    }
    if s.served_by_nixqimg && s.qemu.is_none() {
        out.push(finding(
            "problem",
            s.system,
            format!("no qemu-user for {} where nixqimg looks", s.system),
            Some("install qemu-user-static (or set qemu_dir in nixqimg.conf beside nixqimg)".into()),
        ));
    }
    if s.served_by_nixqimg && flags.contains('F') && s.chroot_qemu.is_none() {
        out.push(finding(
            "warning",
            s.system,
            format!(
                "no {} entry: in a chroot or container that holds no qemu, {} programs fail (nixqimg is pinned by F, qemu is not)",
                crate::interp::route::entry_name(arch::by_name(s.system).unwrap_or(arch::host())),
                s.system
            ),
            Some(format!("nixqimg register --replace {} (with a static qemu installed)", s.system)),
        ));
    }
    if h.binfmt_scope == "container" && !flags.contains('F') {
        out.push(finding(
            "warning",
            s.system,
            "inside a container the interpreter is looked up in the container, where it is usually absent".into(),
            Some(format!("on the host: nixqimg register --direct --replace {}", s.system)),
        ));
    }
}

/// What Nix's settings lack for the systems wanted.
fn nix(h: &Host, n: &NixFact, wanted: &[&str], out: &mut Vec<Finding>) {
    let interp = h.systems.iter().filter(|s| wanted.contains(&s.system));
    let mut needs_files: Vec<PathBuf> = Vec::new();
    let mut platforms: Vec<&'static Arch> = Vec::new();
    for s in interp {
        if let Some(a) = arch::by_name(s.system) {
            platforms.push(a);
        }
        if let (Some(i), Some(f)) = (&s.interpreter, &s.flags) {
            if !f.contains('F') {
                needs_files.push(PathBuf::from(i));
            }
        }
        if s.interpreter_static == Some(false) && (n.sandbox == "true" || n.sandbox == "relaxed") {
            out.push(finding(
                "warning",
                s.system,
                format!(
                    "{} is dynamically linked: inside the Nix sandbox its loader and libraries are not visible",
                    s.interpreter.as_deref().unwrap_or("?")
                ),
                Some(format!("register a static nixqimg: nixqimg register --interpreter STATIC-NIXQIMG {}", s.system)),
            ));
        }
        if s.served_by_nixqimg {
            if let Some(q) = &s.qemu {
                needs_files.push(PathBuf::from(q));
                if s.qemu_static == Some(false) {
                    out.push(finding(
                        "problem",
                        s.system,
                        format!("{q} is dynamically linked: inside the Nix sandbox its libraries are not visible"),
                        Some("install a static qemu-user (Debian: qemu-user-static)".into()),
                    ));
                }
            }
        }
    }
    let facts = crate::nix::NixFacts {
        version: n.version.clone(),
        system: n.system.clone(),
        sandbox: n.sandbox.clone(),
        extra_platforms: n.extra_platforms.clone(),
        sandbox_paths: n.sandbox_paths.clone(),
        store: String::new(),
        daemon: n.daemon,
        builders: String::new(),
    };
    let needs = crate::nix::needs(&platforms, &needs_files);
    for p in crate::nix::problems(&facts, &needs) {
        out.push(finding("problem", "nix", p.what, Some(p.fix)));
    }
    for b in n.builders.iter().filter(|b| !b.answers) {
        let systems = b.systems.join(", ");
        out.push(finding(
            "warning",
            &b.uri,
            format!("builder for {systems} does not answer: {}", b.error.as_deref().unwrap_or("no answer")),
            Some(format!(
                "start it, or fix its line in nix.conf `builders` / the machines file; until then `nixqimg build` emulates {systems} here"
            )),
        ));
    }
}

/// Whose binfmt_misc this is, where that changes the advice.
fn scope(h: &Host, out: &mut Vec<Finding>) {
    match h.binfmt_scope {
        "container" => out.push(finding(
            "info",
            "host",
            "running inside a container: binfmt_misc is the host's; register there".into(),
            Some("on the host: nixqimg register SYSTEM (F pins nixqimg; qemu must be visible in the container), or --direct (a static qemu with F, seen by every container, but without nixqimg's loader choice and guest_base fix)".into()),
        )),
        "nixqimg-ns" => out.push(finding(
            "info",
            "host",
            "binfmt_misc here is the private instance of `nixqimg ns`: its entries exist only in this namespace".into(),
            None,
        )),
        "user-namespace" => out.push(finding(
            "info",
            "host",
            "running in a user namespace: binfmt_misc here is its own instance if it mounted one (Linux >= 6.7), else its parent's".into(),
            None,
        )),
        _ => {}
    }
}

/// One binary: guest_base, the plan, its loader, the tries.
fn binary(b: &Binary, out: &mut Vec<Finding>) {
    if let Some(e) = &b.error {
        out.push(finding("problem", &b.path, e.clone(), None));
        return;
    }
    if b.native {
        out.push(finding("info", &b.path, "runs natively on this host: no qemu involved".into(), None));
        return;
    }
    if let (Some(g), Some(lo)) = (&b.guest_base, &b.lowest_load) {
        let on = format!("{}-byte pages", g.page_size);
        let direct_by_nixqimg = b.plan.as_ref().and_then(|p| p.mode) == Some("direct");
        if g.risk && b.is_static == Some(true) {
            out.push(finding(
                "problem",
                &b.path,
                format!("static ET_EXEC with its lowest load at {lo}, not a multiple of {on}: qemu cannot place it (guest_base failure), and no loader can help"),
                Some(format!("relink it with -Wl,-z,max-page-size={0},-z,common-page-size={0} or build it as PIE", g.page_size)),
            ));
        } else if g.risk {
            let served_by_nixqimg = b.binfmt_entry.as_deref().is_some_and(|e| e.starts_with(binfmt::NAME_PREFIX));
            out.push(finding(
                if served_by_nixqimg && !direct_by_nixqimg { "info" } else { "problem" },
                &b.path,
                format!("guest_base: lowest load {lo} is not a multiple of {on}: qemu run directly fails with 'Unable to find a guest_base'; run loader-first it works"),
                (!served_by_nixqimg).then(|| format!("nixqimg register --replace {}", b.system.unwrap_or("SYSTEM"))),
            ));
        } else {
            out.push(finding("info", &b.path, format!("guest_base: lowest load {lo} can be placed on {on}"), None));
        }
    }
    if let Some(p) = &b.plan {
        if let Some(e) = &p.error {
            out.push(finding(
                "problem",
                &b.path,
                format!("nixqimg cannot run it: {e}"),
                Some("install its loader, or set sysroot in nixqimg.conf / NIXQIMG_SYSROOT".into()),
            ));
        }
    }
    if b.interp_exists == Some(false) && b.plan.as_ref().is_some_and(|p| p.error.is_none()) {
        out.push(finding(
            "info",
            &b.path,
            format!(
                "its loader {} is not on this host; nixqimg uses one it found instead",
                b.interp.as_deref().unwrap_or("")
            ),
            None,
        ));
    }
    for t in &b.tries {
        let ok = t.exit_code == Some(0);
        if !ok {
            let said = first_line(&t.stderr);
            out.push(finding(
                "info",
                &b.path,
                format!(
                    "run {}: {}{}",
                    t.strategy,
                    t.outcome(),
                    if said.is_empty() { String::new() } else { format!(": {said}") }
                ),
                None,
            ));
        }
    }
}
