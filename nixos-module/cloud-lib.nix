# The decisions of the cloud image that are plain data: which serial console, how big an ESP, which
# channel, what `nixqimg image` is told. Written with builtins only (no nixpkgs), so that CI, which has
# Nix but no nixpkgs, evaluates them for real (tests/nix_files.rs) and the module stays a thin caller.
rec {
  # The kernel's console for each target: QEMU's (and Hetzner's) x86 machines have a 16550 UART,
  # its aarch64 `virt` machine a PL011.
  serialConsole =
    system:
    {
      "x86_64-linux" = "ttyS0";
      "aarch64-linux" = "ttyAMA0";
    }
    .${system} or (throw "nixqimg cloud image: no serial console known for ${system}; set nixqimg.cloudImage.serialConsole");

  # systemd-boot copies each generation's kernel and initrd onto the ESP (deduplicated by store
  # path). The worst case is every kept generation with its own kernel: nixpkgs' x86_64 bzImage is
  # ~13 MiB and the aarch64 kernel is an uncompressed `Image` of ~50-65 MiB; a systemd initrd with the
  # QEMU guest modules is ~15-30 MiB. The reserve holds systemd-boot, the BIOS loader and one generation
  # being installed while the oldest is not yet removed.
  perGenerationMiB =
    system:
    {
      "x86_64-linux" = 64;
      "aarch64-linux" = 112;
    }
    .${system} or 128;

  espSizeMiB =
    { system, configurationLimit }:
    let
      raw = 64 + (configurationLimit + 1) * perGenerationMiB system;
      # A multiple of 64 MiB keeps partitions aligned for any erase block size.
      rounded = (raw + 63) / 64 * 64;
    in
    if !(builtins.isInt configurationLimit) || configurationLimit < 1 then
      throw "nixqimg cloud image: configurationLimit must be a positive integer, not ${builtins.toJSON configurationLimit}"
    else
      rounded;

  # The channel that `nixos-rebuild boot --upgrade` follows in the image, as a URL, from a channel
  # name (nixos-26.05, nixos-26.05-small, nixos-unstable, ...) or a URL given as is. It is never
  # guessed from the nixpkgs the image was built from: a flake sets system.nixos.versionSuffix to
  # `.YYYYMMDD.shortRev` for a release branch and for unstable alike, and unstable's release number
  # (lib/.version) is the next release, whose channel does not exist yet.
  channelUrl =
    channel:
    if !(builtins.isString channel) then
      throw "nixqimg cloud image: the channel must be a name such as \"nixos-26.05\" or a URL, not ${builtins.toJSON channel}"
    else if builtins.match "https?://.+" channel != null then
      channel
    else if builtins.match "nixos-[0-9][0-9][.][0-9][0-9](-small)?|nixos-unstable(-small)?|nixpkgs-unstable" channel != null then
      "https://nixos.org/channels/${channel}"
    else
      throw "nixqimg cloud image: \"${channel}\" is not a channel name (nixos-26.05, nixos-unstable, ...) nor a URL";

  # The channel a flake's nixpkgs input follows, from its URL as flake.nix declares it
  # (github:NixOS/nixpkgs/<branch>, or ?ref=<branch>), checked against the release of the nixpkgs
  # that was really locked (its lib.trivial.release): a release branch must be that release, so an
  # input redirected elsewhere (`follows` another nixpkgs, --override-input) is caught, not guessed.
  flakeInputChannel =
    { url, release }:
    let
      m = builtins.match "(github|gitlab):[Nn]ix[Oo][Ss]/nixpkgs(/|[?]ref=)([^/?&]+).*" url;
      branch = if m == null then null else builtins.elemAt m 2;
      stable = if branch == null then null else builtins.match "nixos-([0-9][0-9][.][0-9][0-9])(-small)?" branch;
      ask = "pass `channel` to mkCloudImage (or set nixqimg.cloudImage.channel)";
    in
    if branch == null then
      throw "nixqimg cloud image: the nixpkgs input ${url} names no branch, so the image's channel is unknown: ${ask}"
    else if stable != null && builtins.head stable != release then
      throw "nixqimg cloud image: the nixpkgs input is declared as ${branch} but the locked nixpkgs is release ${release} (an input that follows another nixpkgs?): ${ask}"
    else if stable != null || builtins.match "nixos-unstable(-small)?|nixpkgs-unstable" branch != null then
      branch
    else
      throw "nixqimg cloud image: the nixpkgs input's branch ${branch} is not a NixOS channel: ${ask}";

  # The command boot.loader.systemd-boot.extraInstallCommands runs after every generation change:
  # bios-sync.sh takes the ESP's mount point as its one argument (tests/nix_files.rs runs exactly
  # this argv on a real ESP tree).
  biosSyncCommand =
    {
      shell,
      script,
      esp,
    }:
    [
      shell
      script
      esp
    ];

  # What the cloud image adds to boot.loader.systemd-boot.extraInstallCommands. nixpkgs'
  # systemd-boot.nix writes install-systemd-boot.sh as `#!runtimeShell`, then
  # `systemd-boot "$@"`, then the extra commands, with no `set -e` (read at commit
  # 01e499cec163a442f5edeffa7e618171002cc01e): the script's exit status is that of the last extra
  # command, so a failed systemd-boot install (a full ESP) followed by a good BIOS sync reported
  # success without the new generation. These lines go first (mkOrder 0) so `$?` is still
  # systemd-boot's; a failure of either step ends the script with that step's status.
  # tests/nix_files.rs runs them under bash behind a failing and a succeeding first step.
  installCommands =
    { biosSync }:
    ''
      nixqimg_systemd_boot_status=$?
      if [ "$nixqimg_systemd_boot_status" -ne 0 ]; then
        echo "nixqimg: the systemd-boot install failed (exit $nixqimg_systemd_boot_status); the BIOS menu was left as it was" >&2
        exit "$nixqimg_systemd_boot_status"
      fi
      ${biosSync} || exit $?
    '';

  # BIOS boot only exists where the firmware can do it: x86.
  biosDefault = system: system == "x86_64-linux";

  # The nixpkgs packages whose programs `nixqimg image` runs besides itself (sfdisk; mkfs.ext4 -d and
  # debugfs; sqlite3 for the Nix database; qemu-img; mtools for the BIOS loader). tests/nix_files.rs
  # builds an image with exactly these (their Debian builds) on PATH, and fails without each one.
  imageTools = [
    "util-linux"
    "e2fsprogs"
    "sqlite"
    "qemu-utils"
    "mtools"
  ];

  # The arguments of `nixqimg image` for one image, so the derivation and the Rust test read the
  # same list (tests/nix_files.rs checks every flag against the real binary's `image --help`).
  imageArgs =
    {
      closureInfo,
      toplevel,
      out,
      format ? "qcow2",
      bios ? false,
      espSizeMiB ? null,
      # systemd-boot's menu seconds on the first boot (boot.loader.timeout; later rebuilds rewrite it).
      timeout ? null,
      seed ? null,
    }:
    [
      "image"
      "--closure-info"
      closureInfo
      "--toplevel"
      toplevel
      "--out"
      out
      "--format"
      format
      "--boot"
      (if bios then "hybrid" else "uefi")
    ]
    ++ (if espSizeMiB == null then [ ] else [ "--esp-size" "${toString espSizeMiB}M" ])
    ++ (if timeout == null then [ ] else [ "--timeout" (toString timeout) ])
    ++ (if seed == null then [ ] else [ "--seed" seed ]);

  # /etc/nixos/configuration.nix as the image writes it on first boot: a module that imports the
  # copy of this directory and pins what the image was built with, so `nixos-rebuild` inside the
  # machine rebuilds the same system (tests/nix_files.rs evaluates what this returns).
  configurationNix =
    {
      bios,
      configurationLimit,
      stateVersion,
      channel,
    }:
    ''
      # Written by nixqimg's cloud image on its first boot, and never again: edit it freely.
      # `nixos-rebuild switch` rebuilds this machine from here. To follow a newer NixOS:
      #   nix-channel --add ${channel} nixos && nixos-rebuild boot --upgrade
      # SSH keys, users and the hostname come from cloud-init (NoCloud seed or Hetzner metadata).
      { ... }:
      {
        imports = [ ./nixqimg/cloud-image.nix ];
        nixqimg.cloudImage.channel = ${builtins.toJSON channel};
        nixqimg.cloudImage.bios.enable = ${if bios then "true" else "false"};
        boot.loader.systemd-boot.configurationLimit = ${builtins.toJSON configurationLimit};
        # root's channel was installed on first boot; later generations need not carry nixpkgs.
        system.installer.channel.enable = false;
        # The release whose defaults this machine's state was created with: keep it when upgrading.
        system.stateVersion = ${builtins.toJSON stateVersion};
      }
    '';
}
