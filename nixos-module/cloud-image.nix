# A NixOS cloud image: one disk that boots under UEFI (systemd-boot) and, on x86_64, legacy BIOS
# (the loader on the same ESP that nixqimg installs, kept in step by bios-sync.sh), finds its network,
# SSH keys, hostname and disk size through cloud-init (NoCloud, Hetzner), and can rebuild itself.
#
# Every option set here was checked against the nixpkgs module that declares it (paths below are
# nixpkgs' nixos/modules/...); `lib.mkDefault` marks what you may change without a fight.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  cfg = config.nixqimg.cloudImage;
  cloudLib = import ./cloud-lib.nix;
  system = pkgs.stdenv.hostPlatform.system;
  esp = config.boot.loader.efi.efiSysMountPoint;

  # What runs on every `nixos-rebuild boot|switch` after systemd-boot wrote its entries: a shell
  # script over tools that are in every system closure anyway, so that no target ever has to build
  # nixqimg for itself (an aarch64 laptop building an x86_64 image would otherwise compile it under
  # emulation). tests/bootloader_sync.rs proves it writes what `nixqimg bootloader sync` writes; it
  # needs sh, coreutils, sed and awk.
  biosSync = pkgs.writeShellScript "nixqimg-bios-sync" ''
    export PATH=${
      lib.makeBinPath [
        pkgs.coreutils
        pkgs.gnused
        pkgs.gawk
      ]
    }
    exec ${
      lib.escapeShellArgs (
        cloudLib.biosSyncCommand {
          shell = pkgs.runtimeShell;
          script = "${./bios-sync.sh}";
          inherit esp;
        }
      )
    }
  '';

  # /etc/nixos as the image ships it: this module's directory and a configuration.nix that imports
  # it with the values this image was built with. Written once; after that it is yours.
  configurationNix = pkgs.writeText "configuration.nix" (
    cloudLib.configurationNix {
      bios = cfg.bios.enable;
      inherit (config.boot.loader.systemd-boot) configurationLimit;
      inherit (config.system) stateVersion;
      channel = channelUrl;
    }
  );
  channelUrl = cloudLib.channelUrl cfg.channel;
in
{
  imports = [
    # nixos/modules/profiles/qemu-guest.nix: virtio block, net, rng, console modules in the initrd.
    (modulesPath + "/profiles/qemu-guest.nix")
    # nixos/modules/installer/cd-dvd/channel.nix: installs the nixpkgs this image was built from as
    # root's `nixos` channel on first boot (system.installer.channel.enable), so `nixos-rebuild`
    # works offline from the first minute.
    (modulesPath + "/installer/cd-dvd/channel.nix")
  ];

  options.nixqimg.cloudImage = {
    bios.enable = lib.mkOption {
      type = lib.types.bool;
      default = cloudLib.biosDefault system;
      defaultText = lib.literalExpression ''pkgs.stdenv.hostPlatform.system == "x86_64-linux"'';
      description = ''
        Make the image boot under legacy BIOS as well as UEFI (x86_64 only: Hetzner's x86 servers boot
        one or the other depending on type and age). The BIOS loader reads the same kernels and initrds
        from the ESP; its configuration follows systemd-boot's entries on every rebuild.
      '';
    };

    serialConsole = lib.mkOption {
      type = lib.types.str;
      default = cloudLib.serialConsole system;
      defaultText = lib.literalExpression ''"ttyS0" on x86_64, "ttyAMA0" on aarch64'';
      description = "The serial console the kernel logs to and systemd starts a getty on.";
    };

    espSizeMiB = lib.mkOption {
      type = lib.types.ints.positive;
      default = cloudLib.espSizeMiB {
        inherit system;
        configurationLimit = config.boot.loader.systemd-boot.configurationLimit;
      };
      defaultText = lib.literalExpression "room for boot.loader.systemd-boot.configurationLimit generations";
      description = "Size of the ESP in MiB: it holds a kernel and an initrd per kept generation.";
    };

    format = lib.mkOption {
      type = lib.types.enum [
        "qcow2"
        "raw"
      ];
      default = "qcow2";
      description = "Disk format of system.build.qcow.";
    };

    channel = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "nixos-26.05";
      description = ''
        The channel `nixos-rebuild --upgrade` follows inside the machine (root's `nixos`): a channel
        name (`nixos-26.05`, `nixos-unstable`) or a URL. It cannot be told from the nixpkgs the
        image is built from (a flake's version suffix is `.YYYYMMDD.rev` for a release and for
        unstable alike), so it is set explicitly; the flake's `mkCloudImage` sets it from its
        nixpkgs input's branch. Needed when writeConfiguration is on.
      '';
    };

    writeConfiguration = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        On first boot, write /etc/nixos/configuration.nix (and this module into /etc/nixos/nixqimg) so
        that `nixos-rebuild` inside the machine rebuilds this image's configuration. Turn it off when
        the machine is managed from elsewhere (`nixos-rebuild --flake ... --target-host`).
      '';
    };
  };

  config = {
    assertions = [
      {
        assertion = cfg.bios.enable -> pkgs.stdenv.hostPlatform.isx86;
        message = "nixqimg.cloudImage.bios.enable: legacy BIOS exists only on x86; ${system} boots UEFI only.";
      }
      {
        assertion = cfg.writeConfiguration -> cfg.channel != null;
        message = "nixqimg.cloudImage.channel: say which channel this image follows (e.g. \"nixos-26.05\" or \"nixos-unstable\"); it cannot be told from the nixpkgs it is built from. nixqimg.lib.mkCloudImage sets it from the flake's nixpkgs input.";
      }
      {
        assertion = config.boot.loader.systemd-boot.configurationLimit != null;
        message = "boot.loader.systemd-boot.configurationLimit: the cloud image sizes its ESP for a number of generations; set a number, not null.";
      }
    ];

    # nixos/modules/system/boot/loader/systemd-boot/systemd-boot.nix and loader/loader.nix,
    # loader/efi.nix. No NVRAM writes: a cloud disk must boot from the removable path
    # (EFI/BOOT/BOOT*.EFI) on whatever firmware it lands.
    boot.loader.systemd-boot.enable = true;
    boot.loader.systemd-boot.editor = lib.mkDefault false;
    boot.loader.systemd-boot.configurationLimit = lib.mkDefault 5;
    # First of the extra commands, so it sees systemd-boot's own exit status (cloud-lib.nix).
    boot.loader.systemd-boot.extraInstallCommands = lib.mkIf cfg.bios.enable (
      lib.mkOrder 0 (cloudLib.installCommands { inherit biosSync; })
    );
    boot.loader.timeout = lib.mkDefault 0;
    boot.loader.efi.canTouchEfiVariables = false;
    boot.loader.efi.efiSysMountPoint = "/boot";
    boot.loader.grub.enable = false;

    # nixos/modules/system/boot/systemd/initrd.nix
    boot.initrd.systemd.enable = true;
    # Hetzner's dedicated servers are not virtio: AHCI and NVMe disks too.
    boot.initrd.availableKernelModules = [
      "ahci"
      "nvme"
      "sd_mod"
      "xhci_pci"
    ];

    # nixos/modules/system/boot/grow-partition.nix (a stage-2 service since it supports systemd
    # initrd) grows the partition; autoResize (tasks/filesystems.nix) grows ext4 after it.
    boot.growPartition = true;
    fileSystems."/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
      autoResize = true;
    };
    fileSystems."/boot" = {
      device = "/dev/disk/by-label/ESP";
      fsType = "vfat";
      # The ESP holds systemd-boot's random seed: bootctl warns when others can read it.
      options = [
        "fmask=0077"
        "dmask=0077"
      ];
    };

    # The last console= is /dev/console: the serial port, where cloud-init and systemd report.
    boot.kernelParams = [
      "console=tty0"
      "console=${cfg.serialConsole},115200"
    ];

    # nixos/modules/tasks/network-interfaces.nix, system/boot/networkd.nix: DHCP on every ethernet
    # through networkd; cloud-init's own .network files (10-cloud-init-*, e.g. Hetzner's IPv6) sort
    # first and win. networkd.nix links each unit file into a real /etc/systemd/network directory
    # (not a store link to the whole directory), so cloud-init can write there.
    networking.useNetworkd = true;
    networking.useDHCP = lib.mkDefault true;
    systemd.network.enable = true;
    # One interface up is enough for cloud-init's metadata; waiting for all of them costs 2 minutes.
    systemd.network.wait-online.anyInterface = true;
    # Empty: NixOS then does not own /etc/hostname and cloud-init's update_hostname can set it
    # (a non-empty value makes /etc/hostname a store link that cloud-init cannot write).
    networking.hostName = lib.mkDefault "";

    # nixos/modules/services/networking/ssh/sshd.nix
    services.openssh = {
      enable = true;
      # cloud-init writes the seed's keys to ~/.ssh/authorized_keys.
      authorizedKeysInHomedir = true;
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = lib.mkDefault "prohibit-password";
      };
    };

    # nixos/modules/services/system/cloud-init.nix; the package (pkgs/by-name/cl/cloud-init) carries
    # nixpkgs' NixOS distro patch and has growpart (cloud-utils.guest) and dmidecode on its PATH.
    services.cloud-init = {
      enable = true;
      network.enable = true;
      settings = {
        datasource_list = [
          "NoCloud"
          "Hetzner"
          "None"
        ];
        growpart = {
          mode = "auto";
          devices = [ "/" ];
        };
        # The module's default lists (mkDefault) less what cannot work here, so that `cloud-init
        # status` ends in `done`, not in errors: migrator and rightscale_userdata are gone from
        # cloud-init 24+, rsyslog has nothing to configure, keys-to-console looks for its helper
        # under /usr/lib (ssh-authkey-fingerprints prints the fingerprints anyway), and
        # set-passwords rewrites /etc/ssh/sshd_config, a read-only store link here, for an image
        # that takes keys only.
        cloud_init_modules = [
          "seed_random"
          "bootcmd"
          "write-files"
          "growpart"
          "resizefs"
          "update_hostname"
          "resolv_conf"
          "ca-certs"
          "users-groups"
        ];
        cloud_config_modules = [
          "disk_setup"
          "mounts"
          "ssh-import-id"
          "timezone"
          "disable-ec2-metadata"
          "runcmd"
          "ssh"
        ];
        cloud_final_modules = [
          "scripts-vendor"
          "scripts-per-once"
          "scripts-per-boot"
          "scripts-per-instance"
          "scripts-user"
          "ssh-authkey-fingerprints"
          "phone-home"
          "final-message"
          "power-state-change"
        ];
      };
    };

    # nixos/modules/config/nix.nix (nix.settings is freeform; experimental-features is a list).
    nix.settings.experimental-features = [
      "nix-command"
      "flakes"
    ];
    # nixos/modules/misc/nixpkgs-flake.nix would put `nixpkgs=flake:nixpkgs` first in NIX_PATH, which
    # hides root's channel: `nix-channel --add ... nixos && nixos-rebuild boot --upgrade` would then
    # rebuild from the old pinned nixpkgs. Keep the channel-based NIX_PATH (config/nix-channel.nix),
    # which also names /etc/nixos/configuration.nix.
    nixpkgs.flake.setNixPath = false;

    system.stateVersion = lib.mkDefault config.system.nixos.release;
    # nixos/modules/config/nix-channel.nix (commit 025640dcb7270faa6fe80089fda831b89f3824a9) writes
    # /root/.nix-channels from this (a tmpfiles `f` rule, only when the file is missing); make it
    # agree with the image's channel. Above mkDefault (another module's mkDefault would conflict),
    # below a plain definition of yours.
    system.defaultChannel = lib.mkIf (cfg.channel != null) (lib.mkOverride 900 channelUrl);

    # The image assembly (nixqimg image) finds the BIOS loader's files in the closure.
    system.extraDependencies = lib.optional cfg.bios.enable pkgs.syslinux;

    system.activationScripts.nixqimg-configuration = lib.mkIf cfg.writeConfiguration (
      lib.stringAfter [ "etc" ] ''
        if [ ! -e /etc/nixos/configuration.nix ] && [ ! -e /etc/nixos/flake.nix ]; then
          mkdir -p /etc/nixos/nixqimg
          cp -r --no-preserve=mode ${./.}/. /etc/nixos/nixqimg/
          cp --no-preserve=mode ${configurationNix} /etc/nixos/configuration.nix
        fi
        if [ ! -e /root/.nix-channels ]; then
          echo ${lib.escapeShellArg "${channelUrl} nixos"} > /root/.nix-channels
        fi
      ''
    );

    # nixos/modules/image/images.nix (NixOS 25.05+): `nixos-rebuild build-image --image-variant
    # nixqimg` builds config.system.build.images.nixqimg, this configuration extended with the
    # module below, whose system.build.image is that configuration's own qcow: the same derivation
    # as config.system.build.qcow, since the module changes nothing the system is built from.
    # image.filePath (nixos/modules/image/file-options.nix: baseName.extension) is where the disk is
    # in the output, as image.nix writes it.
    image.modules.nixqimg =
      { config, modulesPath, ... }:
      {
        imports = [ (modulesPath + "/image/file-options.nix") ];
        system.build.image = config.system.build.qcow;
        image.baseName = "nixos";
        image.extension = config.nixqimg.cloudImage.format;
      };

    system.build = {
      # The disk image of this system, assembled by nixqimg on the system's build platform (see
      # image.nix; the flake's packages.<build>.qcow-<target> assembles it on the build machine).
      qcow = import ./image.nix {
        pkgs = pkgs.buildPackages;
        inherit config;
      };
    }
    # The BIOS menu sync as it runs after `nixos-rebuild` (by hand: `$(nix-build '<nixpkgs/nixos>'
    # -A config.system.build.biosSync)`). Defined only when it exists: system.build is lazyAttrsOf,
    # which would keep a mkIf'd attribute and throw on use.
    // lib.optionalAttrs cfg.bios.enable { inherit biosSync; };
  };
}
