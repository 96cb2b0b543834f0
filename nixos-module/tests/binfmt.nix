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
    system.extraDependencies = [ hello ];
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
    conf = machine.succeed("cat /etc/nix/nix.conf")
    t.assertIn("${foreign}", conf, "extra-platforms does not name the emulated system")
  '';
}
