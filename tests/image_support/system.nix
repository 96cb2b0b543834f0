# Small NixOS-shaped systems for nixqimg's image tests, built by real Nix from the host's static busybox:
# a toplevel with boot.json (bootspec v1), kernel/initrd/systemd links, and a data path with the awkward
# things a store holds (executables, symlinks long and short, empty files, spaces, nested directories).
# `kernelSize` > 0 makes the kernel that many bytes (to overflow a small ESP); `extra` (host directories,
# each imported as its own store path) makes a big closure for benches/image.
{ busybox, kernelSize ? 0, tag ? "a", extra ? [ ] }:
let
  bb = builtins.path { path = busybox; name = "busybox-host"; };
  extras = map (p: builtins.path { path = /. + p; name = "extra" + builtins.replaceStrings [ "/" ] [ "-" ] p; }) extra;
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "${bb}/bin/busybox";
    args = [ "sh" "-ec" ("${bb}/bin/busybox --install -s $TMPDIR; export PATH=$TMPDIR\n" + script) ];
  };
  kernel = mk "linux-test-${tag}" ''
    mkdir $out
    echo "kernel ${tag}" > $out/bzImage
    [ ${toString kernelSize} = 0 ] || head -c ${toString kernelSize} /dev/zero >> $out/bzImage
  '';
  initrd = mk "initrd-test-${tag}" "mkdir $out; echo 'initrd ${tag}' > $out/initrd";
  systemd = mk "systemd-test" ''
    mkdir -p $out/lib/systemd/boot/efi
    echo "systemd-boot x64" > $out/lib/systemd/boot/efi/systemd-bootx64.efi
  '';
  data = mk "data-test" ''
    mkdir -p $out/bin $out/share/many "$out/share/with space"
    printf '#!/bin/sh\necho hi\n' > $out/bin/hello
    chmod 0755 $out/bin/hello
    : > $out/share/empty
    ln -s hello $out/bin/hi
    ln -s $out/share/many/a-target-name-long-enough-to-need-its-own-block-on-ext4-xxxxxxxxxxxxxxxx $out/share/long-link
    i=0; while [ $i -lt 300 ]; do echo $i > $out/share/many/f$i; i=$((i+1)); done
    echo x > "$out/share/with space/a file"
  '';
in
derivation {
  name = "nixos-system-test-${tag}";
  system = builtins.currentSystem;
  builder = "${bb}/bin/busybox";
  inherit kernel initrd systemd data extras;
  args = [ "sh" "-ec" ''
    ${bb}/bin/busybox --install -s $TMPDIR; export PATH=$TMPDIR
    mkdir $out
    printf '#!%s/bin/busybox sh\necho init\n' ${bb} > $out/init
    chmod 0755 $out/init
    ln -s $kernel/bzImage $out/kernel
    ln -s $initrd/initrd $out/initrd
    ln -s $systemd $out/systemd
    ln -s $data $out/sw
    i=0; for e in $extras; do ln -s $e $out/extra-$i; i=$((i+1)); done
    cat > $out/boot.json <<EOF
    {"org.nixos.bootspec.v1": {"system": "x86_64-linux", "init": "$out/init", "initrd": "$initrd/initrd",
     "kernel": "$kernel/bzImage", "kernelParams": ["console=ttyS0", "panic=1"], "label": "NixOS test ${tag}",
     "toplevel": "$out"}, "org.nixos.specialisation.v1": {}}
    EOF
  '' ];
}
