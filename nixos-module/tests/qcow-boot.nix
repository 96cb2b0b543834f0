# NixOS test (flake check `qcow-boot`): boot the cloud image exactly as a user gets it (the qcow2 that
# `nixqimg image` assembled, not a test VM built by the framework), with a NoCloud seed, and log in
# over SSH with the seeded key once cloud-init has finished. On x86_64 the same image boots twice:
# UEFI (OVMF) and legacy BIOS (SeaBIOS).
#
# The image has no test backdoor: the script watches its serial console and talks to it only through
# sshd, from the driver, over QEMU's user-network port forward.
#
# With `guestPkgs` of the other architecture (the flake's legacyPackages.<build>.tests) it boots the
# foreign image the build machine assembled, under full emulation (TCG): the cross-architecture case.
#
# With `expectFailure` (the flake check `qcow-boot-failure`) the image is a disk with nothing on it:
# the boot must fail within `consoleTimeout`, and the check passes only if that failure ended the
# machine (QEMU gone, its serial reader finished) instead of leaving the check hanging.
{
  pkgs,
  # A derivation whose output holds nixos.qcow2 (image.nix).
  image,
  # nixpkgs of the image's system; its firmware (data, from the binary cache) boots the image.
  guestPkgs ? pkgs,
  expectFailure ? false,
  # Seconds to wait for cloud-init's last line on the console.
  consoleTimeout ? if expectFailure then 120 else 1800,
}:
let
  inherit (pkgs) lib;
  inherit (import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs) snakeOilPrivateKey snakeOilPublicKey;
  qemuCommon = import "${pkgs.path}/nixos/lib/qemu-common.nix" { inherit lib pkgs; };
  guest = guestPkgs.stdenv.hostPlatform;
  native = guest.system == pkgs.stdenv.hostPlatform.system;
  # qemu_test only emulates the host's own architecture; a foreign guest needs the full qemu.
  # pauth-impdef=on: arm64 pointer authentication is several times faster under TCG with it.
  qemu =
    if native then
      qemuCommon.qemuBinary pkgs.qemu_test
    else if guest.isx86_64 then
      "${pkgs.qemu}/bin/qemu-system-x86_64 -machine q35 -cpu max"
    else
      "${pkgs.qemu}/bin/qemu-system-aarch64 -machine virt -cpu max,pauth-impdef=on";
  isX86 = guest.isx86_64;
  hostname = "nixqimg-check";

  # A NoCloud seed as `nixqimg seed` makes it: a FAT volume labelled CIDATA.
  seed =
    pkgs.runCommand "nocloud-seed.img"
      {
        nativeBuildInputs = [
          pkgs.dosfstools
          pkgs.mtools
        ];
      }
      ''
        cat > user-data <<EOF
        #cloud-config
        users:
          - name: root
            ssh_authorized_keys:
              - "${snakeOilPublicKey}"
        EOF
        cat > meta-data <<EOF
        instance-id: iid-nixqimg-check
        local-hostname: ${hostname}
        EOF
        truncate -s 4M $out
        mkfs.vfat -n CIDATA $out
        mcopy -i $out user-data meta-data ::
      '';

  drives = lib.concatStringsSep " " [
    "-m 1536 -smp 2"
    "-drive file=@DISK@,format=qcow2,if=none,id=disk -device virtio-blk-pci,drive=disk"
    "-drive file=${seed},format=raw,if=none,id=seed,readonly=on -device virtio-blk-pci,drive=seed"
    "-nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:@PORT@-:22"
  ];
in
pkgs.testers.runNixOSTest {
  name = "nixqimg-qcow-boot-${lib.optionalString expectFailure "failure-"}${guest.system}";
  nodes = { };
  # nixos/lib/testing/driver.nix: beyond it the driver releases the machines it tracks and stops.
  globalTimeout = if expectFailure then 600 else 60 * 60;
  # create_machine is typed as returning BaseMachine, which lacks the console methods of the
  # QemuMachine it returns: mypy would reject what runs fine.
  skipTypeCheck = true;
  testScript = ''
    import os
    import shutil
    import subprocess

    key = os.path.join(os.environ.get("TMPDIR", "/tmp"), "id_snakeoil")
    shutil.copy("${snakeOilPrivateKey}", key)
    os.chmod(key, 0o600)

    def ssh(port, command):
        return subprocess.run(
            ["${pkgs.openssh}/bin/ssh", "-p", str(port), "-i", key,
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=120,
        )

    tmp = os.environ.get("TMPDIR", "/tmp")

    started = []
    # The list the driver releases on cleanup and on its global timeout: machines_qemu in drivers
    # with containers, the plain machines list before them.
    tracked = getattr(driver, "machines_qemu", None)
    if tracked is None:
        tracked = driver.machines

    def boot(name, firmware_flags, port):
        # An 8 GiB disk over the (smaller) image, as a cloud provider gives one: the root must grow.
        disk = os.path.join(tmp, f"{name}.qcow2")
        subprocess.run(["${pkgs.qemu-utils}/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", "${image}/nixos.qcow2", disk, "8G"], check=True)
        vm = create_machine(
            f"${qemu} {firmware_flags} ${drives}".replace("@PORT@", str(port)).replace("@DISK@", disk),
            name=name,
        )
        started.append(vm)
        # The driver does not track what create_machine returns (nixos/lib/test-driver/src/
        # test_driver/driver.py): neither its cleanup nor its global timeout would release it, and
        # QEMU's serial reader is not a daemon thread, so a failure before crash() left QEMU
        # running and the check hung instead of failing. Tracked, and released on every way out.
        tracked.append(vm)
        try:
            run_checks(vm, port)
        finally:
            vm.release()
            tracked.remove(vm)

    def run_checks(vm, port):
        vm.start()
        # cloud-init's final stage prints this line on the console when every stage has run.
        vm.wait_for_console_text("Cloud-init v. .* finished", timeout=${toString consoleTimeout})
        retry(lambda last: ssh(port, "true").returncode == 0, timeout_seconds=300)
        status = ssh(port, "cloud-init status --wait --long")
        print(status.stdout, status.stderr)
        t.assertIn("status: done", status.stdout)
        t.assertEqual(ssh(port, "hostname").stdout.strip(), "${hostname}")
        # The root is the ext4 labelled nixos, and growpart + resize grew it to the 8 GiB disk.
        t.assertEqual(ssh(port, "lsblk -no LABEL $(findmnt -no SOURCE /)").stdout.strip(), "nixos")
        size = int(ssh(port, "df -B1 --output=size / | tail -1").stdout.strip())
        t.assertGreater(size, 6 * 2**30, "the root filesystem did not grow to the disk")
        # No password logins: keys only.
        t.assertIn("passwordauthentication no", ssh(port, "sshd -T").stdout.lower())
        # The image carries a configuration that reproduces it.
        t.assertEqual(ssh(port, "test -e /etc/nixos/configuration.nix && nix-instantiate --parse /etc/nixos/configuration.nix >/dev/null").returncode, 0)
        vm.crash()

    vars_file = os.path.join(tmp, "vars.fd")
    shutil.copy("${guestPkgs.OVMF.fd.variables}", vars_file)
    os.chmod(vars_file, 0o600)
    uefi = ("-drive if=pflash,format=raw,unit=0,readonly=on,file=${guestPkgs.OVMF.fd.firmware} "
            f"-drive if=pflash,format=raw,unit=1,file={vars_file}")
  '' + (if expectFailure then ''
    with subtest("a disk that cannot boot fails the check, and the failure ends the machine"):
        try:
            boot("uefi", uefi, 2222)
        except Exception as e:
            print(f"the boot failed, as it must: {e!r}")
        else:
            raise Exception("an empty disk reached cloud-init: this check tests nothing")
        (vm,) = started
        # Raises TimeoutExpired if QEMU outlived the failure (what used to hang the check).
        vm.process.wait(timeout=30)
        t.assertFalse(vm.serial_thread.is_alive(), "the serial reader outlived QEMU")
        t.assertNotIn(vm, tracked)
  '' else ''
    with subtest("UEFI boot, cloud-init, ssh with the seeded key"):
        boot("uefi", uefi, 2222)
    ${lib.optionalString isX86 ''
      with subtest("legacy BIOS boot of the same image"):
          boot("bios", "", 2223)
    ''}
  '');
}
