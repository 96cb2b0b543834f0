# nixqimg as the binfmt_misc interpreter for foreign systems: registered with P (argv[0] kept, no
# shell wrapper) and F (pinned, so Nix sandboxes see it), with the sandbox paths and platforms Nix
# needs. Magic and mask come from binfmt-table.json, which nixqimg itself generates from its arch
# table (`nixqimg nix-config --module-table`); a Rust test keeps the file current.
{
  config,
  options,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;
  cfg = config.nixqimg.binfmt;
  # The decisions (take-over magic, which wrapper calls the overlay answers, whether pkgs may take
  # an overlay) live in binfmt-lib.nix, plain Nix that tests/nix_files.rs evaluates.
  binfmtLib = import ./binfmt-lib.nix;
  inherit (binfmtLib) bySystem;
  hostSystem = pkgs.stdenv.hostPlatform.system;

  nixqimg = cfg.package;
  interpreter = lib.getExe nixqimg;

  # Systems nixpkgs' own module registers (boot.binfmt.emulatedSystems) that nixqimg takes over.
  takenOver = lib.optionals cfg.takeOverEmulatedSystems (
    lib.filter (s: bySystem ? ${s}) config.boot.binfmt.emulatedSystems
  );
  # Systems only this module registers, under nixqimg's own entry names.
  own = lib.filter (s: !(lib.elem s takenOver)) cfg.emulatedSystems;
  served = own ++ takenOver;

  common = {
    inherit interpreter;
    preserveArgvZero = true;
    fixBinary = cfg.fixBinary;
    wrapInterpreterInShell = false;
    interpreterSandboxPath = "${nixqimg}";
  };
  ownRegistration = system: {
    name = bySystem.${system}.entryName;
    value = common // {
      recognitionType = "magic";
      offset = 0;
      magicOrExtension = bySystem.${system}.magic;
      mask = bySystem.${system}.mask;
    };
  };
  # With F, nixqimg also runs in chroots and containers that hold no qemu: beside each of its
  # entries a marker entry (flags POF) pins the static qemu, and nixqimg routes execs there when
  # it finds no qemu (README "Chroots and containers").
  markerRegistration = system: {
    name = bySystem.${system}.markerEntryName;
    value = {
      interpreter = "${nixqimg.qemu}/bin/${bySystem.${system}.qemu}";
      recognitionType = "magic";
      offset = 0;
      magicOrExtension = bySystem.${system}.markerMagic;
      mask = bySystem.${system}.markerMask;
      preserveArgvZero = true;
      openBinary = true;
      fixBinary = true;
      wrapInterpreterInShell = false;
      interpreterSandboxPath = "${nixqimg.qemu}";
    };
  };
  # nixpkgs' entries keep their names; who serves them and what they match change. Plain
  # assignments beat the mkDefault values nixpkgs gives the interpreter and flags (its
  # wrapQemuBinfmtP wrapper, or the bare static qemu when preferStaticEmulators is set, in which
  # case the overlay alone would never be consulted). nixpkgs merges its magic and mask in as plain
  # definitions (nixos/modules/system/boot/binfmt.nix), so nixqimg's own ones need mkForce; its
  # i686-linux magic matches no real i686 program (binfmt-lib.nix, takeOverMatch).
  takeOver = system: {
    name = system;
    value = common // lib.mapAttrs (_: lib.mkForce) (binfmtLib.takeOverMatch system);
  };

  # For machines that keep nixpkgs' module: its P wrapper becomes nixqimg itself, for the qemus in
  # nixqimg's table only.
  overlay = binfmtLib.wrapQemuBinfmtPOverlay interpreter;
  pkgsWritable = binfmtLib.pkgsAreWritable options;
in
{
  options.nixqimg.binfmt = {
    enable = lib.mkEnableOption "nixqimg as the binfmt_misc interpreter for foreign systems";

    emulatedSystems = mkOption {
      type = types.listOf (types.enum (lib.attrNames bySystem));
      default = [ ];
      example = [ "aarch64-linux" ];
      description = "Systems whose programs the kernel hands to nixqimg (never the machine's own).";
    };

    strategy = mkOption {
      type = types.enum [
        "auto"
        "direct"
        "loader-first"
      ];
      default = "auto";
      description = ''
        How nixqimg starts dynamic programs: "auto" picks per program; "direct" hands them to qemu;
        "loader-first" runs their dynamic loader under qemu (avoids qemu's guest_base failure on
        hosts with 16K/64K pages).
      '';
    };

    fixBinary = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Register with F: the kernel opens nixqimg at registration, so chroots and Nix sandboxes see
        it without it being mounted there.
      '';
    };

    takeOverEmulatedSystems = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Also serve the systems in boot.binfmt.emulatedSystems with nixqimg, replacing nixpkgs'
        qemu wrapper or bare qemu in those registrations.
      '';
    };

    overlay = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Add an overlay that makes pkgs.wrapQemuBinfmtP return nixqimg for the qemus in nixqimg's
        table (other systems keep nixpkgs' wrapper), for configurations that use that function
        elsewhere. Has no effect, with a warning, when this configuration's pkgs are read-only
        (`nixpkgs.pkgs` given, as in runNixOSTest nodes): apply the overlay where those pkgs are
        made instead.
      '';
    };

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { inherit (cfg) strategy; };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { inherit (cfg) strategy; }";
      description = ''
        The static nixqimg, with its static qemu-user fixed at build time (on aarch64 build machines
        nixpkgs' pkgsStatic.qemu-user with the upstream fixes it needs, see binfmt-lib.nix).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (nixqimg.qemu or null) != null;
        message = "nixqimg.binfmt.package has no qemu-user built in (staticQemu = null makes the image-only build); the interpreter needs one.";
      }
      {
        assertion = !(lib.elem hostSystem served);
        message = "nixqimg.binfmt.emulatedSystems must not hold the machine's own system ${hostSystem}.";
      }
    ];

    boot.binfmt.registrations = lib.listToAttrs (
      map ownRegistration own ++ map takeOver takenOver ++ lib.optionals cfg.fixBinary (map markerRegistration served)
    );

    nixpkgs.overlays = lib.mkIf (cfg.overlay && pkgsWritable) [ overlay ];
    warnings = lib.optional (cfg.overlay && !pkgsWritable) (
      "nixqimg.binfmt.overlay has no effect: this configuration's pkgs are read-only (nixpkgs.pkgs "
      + "is set, e.g. a runNixOSTest node), so nixpkgs.overlays cannot be extended. The registrations "
      + "are served by nixqimg anyway (takeOverEmulatedSystems); for pkgs.wrapQemuBinfmtP itself, "
      + "apply the overlay where those pkgs are made."
    );

    # What `nixqimg nix-config` prints, in store paths: the interpreter and the qemu it execs
    # (a package directory each, never a directory and a path inside it). /run/binfmt holds the
    # links the registrations name.
    nix.settings = lib.mkIf (served != [ ]) {
      extra-platforms = served;
      extra-sandbox-paths = [
        "/run/binfmt"
        "${nixqimg}"
        "${nixqimg.qemu}"
      ];
    };
  };
}
