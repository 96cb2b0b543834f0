# NixOS test (flake check `binfmt`): a machine with nixqimg's binfmt module runs a program of the
# other architecture (GNU hello from nixpkgs for that system: dynamic, its loader in the store) through
# the kernel's binfmt_misc, and Nix there is set up to build for that system.
{
  pkgs,
  # nixosModules.binfmt
  binfmtModule,
  # nixpkgs for the foreign system (the flake passes nixpkgs.legacyPackages.<other>).
  foreignPkgs,
}:
let
  foreign = foreignPkgs.stdenv.hostPlatform.system;
  hello = foreignPkgs.hello;
  bash = foreignPkgs.bash;
in
pkgs.testers.runNixOSTest {
  name = "nixqimg-binfmt";
  nodes.machine = {
    imports = [ binfmtModule ];
    nixqimg.binfmt = {
      enable = true;
      emulatedSystems = [ foreign ];
    };
    # In the VM's store without being on its PATH.
    system.extraDependencies = [
      hello
      bash
    ];
    # A derivation of the foreign system whose builder is that system's bash: Nix runs it in its
    # sandbox, through the kernel's binfmt_misc, nixqimg and qemu (extra-platforms and
    # extra-sandbox-paths come from the module). storePath gives the builder's path its context.
    environment.etc."nixqimg-foreign-build.nix".text = ''
      derivation {
        name = "nixqimg-foreign-build";
        system = "${foreign}";
        builder = "''${builtins.storePath "${bash}"}/bin/bash";
        args = [ "-c" "echo \"built by $BASH_VERSION on $HOSTTYPE\" > $out" ];
      }
    '';
  };
  testScript = ''
    machine.wait_for_unit("systemd-binfmt.service")
    entries = machine.succeed("grep -l nixqimg /proc/sys/fs/binfmt_misc/* || true")
    t.assertNotEqual(entries.strip(), "", "no binfmt_misc entry runs nixqimg")
    out = machine.succeed("${hello}/bin/hello")
    t.assertEqual(out.strip(), "Hello, world!")
    # argv[0] reaches the foreign program unchanged (the P flag and nixqimg's -0).
    # hello's --help names itself by argv[0].
    out = machine.succeed("bash -c 'exec -a greeter ${hello}/bin/hello --help' | head -1")
    t.assertTrue(out.startswith("Usage: greeter "), out)
    # A build for the foreign system, sandbox on, offline: bash reports the CPU it was built for.
    built = machine.succeed("nix-build --no-out-link --option substituters ''' /etc/nixqimg-foreign-build.nix").strip()
    t.assertIn("on ${bash.stdenv.hostPlatform.parsed.cpu.name}", machine.succeed(f"cat {built}"))
    conf = machine.succeed("cat /etc/nix/nix.conf")
    t.assertIn("${foreign}", conf, "extra-platforms does not name the emulated system")
  '';
}
