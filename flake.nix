{
  description = "nixqimg: foreign programs under qemu-user through binfmt_misc, and NixOS cloud images built without a VM";

  # Upstream nixpkgs only: no fork, no other input. Everything below works with a stock channel.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # The systems we make images for, and the build machines we support: the same two.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = lib.genAttrs systems;
      # The foreign system of a build machine, for the binfmt check.
      other = system: if system == "x86_64-linux" then "aarch64-linux" else "x86_64-linux";

      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
        };

      # The image of `nixos` assembled by `buildPkgs`' own nixqimg: on an x86_64 machine making an
      # aarch64 image the assembly runs natively, the disk is only bytes (see nixos-module/image.nix).
      # The closure it packs is not: the toplevel's own derivations (etc, system-path, the initrd,
      # units) are aarch64 builds no binary cache has, so they still need aarch64 builds once
      # (nixosModules.binfmt, a remote builder, or crossFrom).
      imageOn =
        buildPkgs: nixos:
        import ./nixos-module/image.nix {
          pkgs = buildPkgs;
          inherit (nixos) config;
        };

      # The channel the images follow inside the machine: the branch this flake's nixpkgs input is
      # declared with, checked against the release that was locked (cloud-lib.nix).
      inputChannel = cloudLib.flakeInputChannel {
        url = (import ./flake.nix).inputs.nixpkgs.url;
        inherit (lib.trivial) release;
      };
      cloudLib = import ./nixos-module/cloud-lib.nix;

      mkCloudImage =
        {
          # The system the image runs on: "x86_64-linux" or "aarch64-linux".
          system,
          # The channel `nixos-rebuild --upgrade` follows in the machine ("nixos-26.05",
          # "nixos-unstable" or a URL). Default: this flake's nixpkgs input's branch; give it when
          # nixqimg's nixpkgs follows another input.
          channel ? null,
          # Your own NixOS modules, on top of nixosModules.cloud-image.
          modules ? [ ],
          # Set to the build machine's system to cross-compile the whole system (`crossSystem`)
          # instead of taking the target's packages from the binary cache and emulating the rest.
          crossFrom ? null,
          specialArgs ? { },
        }:
        let
          nixos = lib.nixosSystem {
            inherit specialArgs;
            modules = [
              self.nixosModules.cloud-image
              { nixpkgs.hostPlatform = system; }
              { nixqimg.cloudImage.channel = lib.mkDefault (if channel != null then channel else inputChannel); }
              (lib.optionalAttrs (crossFrom != null) { nixpkgs.buildPlatform = crossFrom; })
            ] ++ modules;
          };
        in
        nixos
        // {
          # Assembled by a derivation of the system's own build platform: the target under
          # emulation (nixqimg's binfmt) for a native config, the build machine for a cross one.
          # Works from any machine that can build the target's derivations.
          qcow = nixos.config.system.build.qcow;
          # Assembled natively by `buildSystem`'s nixqimg: what `packages.<build>.qcow-<target>` is
          # (the closure's own target builds still come from wherever the target builds: above).
          qcowOn = buildSystem: imageOn (pkgsFor buildSystem) nixos;
        };
    in
    {
      lib = {
        inherit mkCloudImage;
      };

      nixosModules = {
        cloud-image = ./nixos-module/cloud-image.nix;
        binfmt = ./nixos-module/binfmt.nix;
        # Only the binfmt module: it does nothing until enabled, while importing cloud-image turns
        # a configuration into a cloud image.
        default = ./nixos-module/binfmt.nix;
      };

      overlays.default = final: prev: {
        nixqimg = final.callPackage ./nixos-module/package.nix { };
      };

      # The example images: the stock cloud image, with nothing of yours in it.
      # `nix build .#nixosConfigurations.aarch64-linux.qcow` works from either kind of machine.
      nixosConfigurations = forAllSystems (system: mkCloudImage { inherit system; });

      packages = forAllSystems (
        build:
        let
          pkgs = pkgsFor build;
        in
        {
          nixqimg = pkgs.nixqimg;
          default = pkgs.nixqimg;
        }
        // lib.listToAttrs (
          map (target: {
            name = "qcow-${target}";
            value = self.nixosConfigurations.${target}.qcowOn build;
          }) systems
        )
      );

      apps = forAllSystems (system: {
        default = {
          type = "app";
          program = "${self.packages.${system}.nixqimg}/bin/nixqimg";
          meta.description = "nixqimg: binfmt interpreter, registration, doctor, image builder";
        };
      });

      # Need nixpkgs and a machine that can run NixOS tests (KVM makes them minutes, not hours):
      # `nix flake check` or `nix build .#checks.x86_64-linux.qcow-boot`.
      checks = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        {
          qcow-boot = import ./nixos-module/tests/qcow-boot.nix {
            inherit pkgs;
            image = self.packages.${system}."qcow-${system}";
          };
          # The same script on a disk with nothing on it: the boot must fail, and the failure must
          # end the check (QEMU released) instead of hanging it.
          qcow-boot-failure = import ./nixos-module/tests/qcow-boot.nix {
            inherit pkgs;
            expectFailure = true;
            image = pkgs.runCommand "nixqimg-empty-disk" { nativeBuildInputs = [ pkgs.qemu-utils ]; } ''
              mkdir $out
              qemu-img create -q -f qcow2 $out/nixos.qcow2 1G
            '';
          };
          # `nixos-rebuild build-image --image-variant nixqimg --flake .#<system>` builds
          # config.system.build.images.nixqimg (nixos/modules/image/images.nix): the same
          # derivation as config.system.build.qcow, with the disk where passthru.filePath says.
          build-image-variant =
            let
              inherit (self.nixosConfigurations.${system}.config.system.build) images qcow;
              variant = images.nixqimg;
            in
            assert variant.drvPath == qcow.drvPath;
            assert variant.passthru.filePath == "nixos.qcow2";
            pkgs.runCommand "nixqimg-build-image-variant" { nativeBuildInputs = [ pkgs.qemu-utils ]; } ''
              qemu-img info ${variant}/${variant.passthru.filePath} | grep -q '^file format: qcow2$'
              touch $out
            '';
          binfmt = import ./nixos-module/tests/binfmt.nix {
            inherit pkgs;
            binfmtModule = self.nixosModules.binfmt;
            foreignPkgs = nixpkgs.legacyPackages.${other system};
          };
        }
      );

      # Not in `checks`, since they need the other architecture's system built (binfmt, e.g.
      # nixosModules.binfmt, or a remote builder): the foreign image this machine assembled, booted
      # under full emulation. `nix build -L .#legacyPackages.x86_64-linux.tests.qcow-boot-aarch64-linux`
      legacyPackages = forAllSystems (system: {
        tests."qcow-boot-${other system}" = import ./nixos-module/tests/qcow-boot.nix {
          pkgs = pkgsFor system;
          image = self.packages.${system}."qcow-${other system}";
          guestPkgs = nixpkgs.legacyPackages.${other system};
        };
      });

      formatter = forAllSystems (system: nixpkgs.legacyPackages.${system}.nixfmt);
    };
}
