# The decisions of the binfmt side that are plain data: which static qemu-user a build machine gets
# (and which upstream fixes it needs), what a taken-over nixpkgs registration matches, which of
# nixpkgs' wrapQemuBinfmtP calls nixqimg may answer. Written with builtins only (no nixpkgs), so that
# CI, which has Nix but no nixpkgs, evaluates them for real (tests/nix_files.rs); package.nix and
# binfmt.nix are thin callers.
rec {
  table = builtins.fromJSON (builtins.readFile ./binfmt-table.json);
  bySystem = builtins.listToAttrs (
    map (e: {
      name = e.system;
      value = e;
    }) table.systems
  );

  # --- The static qemu-user that nixqimg execs (package.nix) ---------------------------------
  #
  # nixpkgs' pkgsStatic.qemu-user does not build, or does not run, on aarch64-linux (read in
  # pkgs/applications/virtualization/qemu/default.nix at qemu 10.1.2, and the issues named here):
  # - NixOS/nixpkgs#464805 (open): linking the static nettle that gnutls pulls in fails with
  #   "relocation truncated to fit: R_AARCH64_LD64_GOTPAGE_LO15 ... recompile with -fPIC". qemu's
  #   derivation always has gnutls in buildInputs and passes "--enable-gnutls" (it has no switch for
  #   it); #499871 (closed, not merged) would have dropped gnutls for userOnly builds, where it only
  #   seeds the RNG. So: no gnutls, no nettle.
  # - NixOS/nixpkgs#366902 and #362367: the static-pie binary segfaults at start on arm64;
  #   #500039 (open, not merged) adds "--disable-pie" when static on aarch64; qemu's configure
  #   does not notice by itself that PIE cannot work there.
  # x86_64 gets nixpkgs' package unchanged (so a binary cache can serve it).
  staticQemuFixes =
    system:
    if system == "aarch64-linux" then
      {
        # Dropped from qemu's own lists, then the opposites added.
        dropConfigureFlags = [ "--enable-gnutls" ];
        addConfigureFlags = [
          "--disable-gnutls"
          "--disable-nettle"
          "--disable-pie"
        ];
        dropBuildInputs = [
          "gnutls"
          "nettle"
        ];
        why = "NixOS/nixpkgs#464805 (static nettle via gnutls fails to link), #366902/#362367 (static-pie segfaults; #500039)";
      }
    else
      null;

  # The function overrideAttrs takes, for a set of fixes: qemu's configureFlags and buildInputs
  # with the named ones removed (buildInputs by pname) and the new flags appended.
  applyQemuFixes =
    fixes: old:
    let
      pnameOf = p: if builtins.isAttrs p then p.pname or (p.name or "") else "";
    in
    {
      configureFlags =
        builtins.filter (f: !(builtins.elem f fixes.dropConfigureFlags)) (old.configureFlags or [ ])
        ++ fixes.addConfigureFlags;
      buildInputs = builtins.filter (p: !(builtins.elem (pnameOf p) fixes.dropBuildInputs)) (
        old.buildInputs or [ ]
      );
    };

  # The qemu-user to build nixqimg against, from pkgsStatic (its hostPlatform's system decides).
  staticQemuFor =
    pkgsStatic:
    let
      fixes = staticQemuFixes pkgsStatic.stdenv.hostPlatform.system;
    in
    if fixes == null then pkgsStatic.qemu-user else pkgsStatic.qemu-user.overrideAttrs (applyQemuFixes fixes);

  # --- Taking over nixpkgs' registrations (binfmt.nix) ---------------------------------------
  #
  # nixpkgs' nixos/modules/system/boot/binfmt.nix gives each emulated system the magic and mask of
  # nixos/lib/binfmt-magics.nix, merged in with `//` (plain definitions, not mkDefault). Its
  # i686-linux entry matches e_machine 0x06 (EM_486, read at commit
  # 8bccf164c099d99f7d4e1729f618ebb1001d464e), which no i686 toolchain emits: real i386/i686 ELF
  # files say 0x03 (EM_386). A taken-over entry therefore gets nixqimg's own magic and mask, the
  # ones its arch table checks against real ELF headers.
  takeOverMatch = system: {
    magicOrExtension = bySystem.${system}.magic;
    mask = bySystem.${system}.mask;
  };

  # --- The wrapQemuBinfmtP overlay (binfmt.nix, overlay = true) -----------------------------
  #
  # nixpkgs' binfmt.nix calls `pkgs.wrapQemuBinfmtP "qemu-${qemuArch}-binfmt-P" interpreter` for
  # every qemu-backed emulated system. Only the name tells which system it is for; nixqimg answers
  # only the names of the qemus in its own table and hands every other call to nixpkgs' wrapper.
  # (Two names are shared in nixpkgs: armv6l and armv7l both have qemuArch "arm", aarch64_be and
  # aarch64 both "aarch64" (lib/systems/default.nix). The kernel hands such a wrapper only programs
  # matching the entry's magic; nixqimg then picks qemu from the program's ELF header itself.)
  wrapperName = e: "${e.qemu}-binfmt-P";
  overlayServes = name: builtins.any (e: wrapperName e == name) table.systems;

  # The overlay itself: `interpreter` is nixqimg's binary (a store path string).
  wrapQemuBinfmtPOverlay = interpreter: final: prev: {
    wrapQemuBinfmtP =
      name: emulator:
      if overlayServes name then
        final.runCommand name { } ''
          mkdir -p $out/bin
          ln -s ${interpreter} $out/bin/${name}
        ''
      else
        prev.wrapQemuBinfmtP name emulator;
  };

  # Under read-only pkgs (nixpkgs.pkgs given, as runNixOSTest does for its nodes:
  # nixos/modules/misc/nixpkgs/read-only.nix) `nixpkgs.overlays` is a `types.unique` option that
  # read-only.nix itself defines, so any further definition is an evaluation error. read-only.nix
  # also drops the legacy options the ordinary nixpkgs module declares, such as `localSystem`:
  # that is how a module can tell the two apart from `options`.
  pkgsAreWritable = options: options.nixpkgs ? localSystem;
}
