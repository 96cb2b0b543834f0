# The disk image of a NixOS system, assembled by `nixqimg image` from the system's closure: no VM, no
# KVM, no emulation in the assembly itself. `pkgs` is whoever runs the assembly: the build machine's
# packages make an aarch64 image on x86_64 (and back) natively, since a disk is only bytes
# (partitions, FAT, ext4, the store). The closure is another matter: the toplevel's own derivations
# (etc, system-path, the initrd, units) are builds for the image's system that no binary cache
# holds, so a foreign image still needs that system's builds once (nixqimg's binfmt, a remote
# builder, or crossFrom); only their outputs are read here.
# The result is a directory holding `nixos.qcow2` (or `nixos.raw`), as `result/nixos.qcow2`.
{
  pkgs,
  # The evaluated NixOS configuration (nixosSystem's `config`), with nixqimg.cloudImage options.
  config,
  # nixqimg without a qemu-user: the assembly runs nothing foreign, and the static qemu-user does
  # not build on every build machine (binfmt-lib.nix, staticQemuFixes). Its only qemu is qemu-img
  # (qemu-utils, cloud-lib.nix's imageTools), for the qcow2 conversion.
  nixqimg ? pkgs.callPackage ./package.nix { staticQemu = null; },
}:
let
  cloudLib = import ./cloud-lib.nix;
  cfg = config.nixqimg.cloudImage;
  toplevel = config.system.build.toplevel;
  # store-paths and registration of the whole closure: what nixqimg copies and registers in the
  # image's Nix database. closureInfo only reads references, so the build machine can make it for a
  # foreign system without running anything of that system.
  closure = pkgs.closureInfo { rootPaths = [ toplevel ]; };
  file = "nixos.${cfg.format}";
  # nixpkgs.hostPlatform is a string or an (elaborated) platform; elaborate takes both.
  targetSystem = (pkgs.lib.systems.elaborate config.nixpkgs.hostPlatform).system;
  args = cloudLib.imageArgs {
    closureInfo = "${closure}";
    toplevel = "${toplevel}";
    out = "${placeholder "out"}/${file}";
    inherit (cfg) format espSizeMiB;
    bios = cfg.bios.enable;
    inherit (config.boot.loader) timeout;
  };
in
pkgs.runCommand "nixos-image-${config.system.nixos.label}-${targetSystem}"
  {
    # The field's tools for the parts nixqimg does not write itself (cloud-lib.nix's imageTools).
    nativeBuildInputs = map pkgs.lib.getBin ([ nixqimg ] ++ map (name: pkgs.${name}) cloudLib.imageTools);
    passthru = {
      inherit toplevel closure;
      imageFile = file;
    };
  }
  ''
    mkdir -p $out
    nixqimg ${pkgs.lib.escapeShellArgs args}
    mkdir -p $out/nix-support
    echo "file ${cfg.format} $out/${file}" > $out/nix-support/hydra-build-products
  ''
