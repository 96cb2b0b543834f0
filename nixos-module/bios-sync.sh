#!/bin/sh
# bios-sync.sh ESP
#
# What `nixqimg bootloader sync --esp ESP` does, in POSIX sh over tools every NixOS system already
# has (coreutils, sed, awk), so a machine need not build nixqimg for its own architecture to keep
# BIOS boot in step: regenerates ESP/syslinux.cfg from systemd-boot's loader/entries/*.conf and
# loader/loader.conf. It must write the same bytes as nixqimg (tests/bootloader_sync.rs checks it);
# the rules are written down in nixqimg's src/image/bootloader.rs.
#
# Run from boot.loader.systemd-boot.extraInstallCommands. Exit status 1 when an entry had to be left
# out (one line on stderr each) or when there is no bootable entry (syslinux.cfg is then left alone).
set -u
LC_ALL=C
export LC_ALL
esp=${1:?usage: bios-sync.sh ESP}
dir=$esp/loader/entries
tab=$(printf '\t')
me=bios-sync

if [ ! -d "$dir" ]; then
  echo "$me: $dir: not a directory (--esp must be the ESP holding systemd-boot's loader/entries)" >&2
  exit 1
fi

# key/value lines the way systemd-boot reads them: prints "KEY<TAB>VALUE" for the keys asked for.
kv_awk='
function kv(line,   i) {
  sub(/\r$/, "", line)
  sub(/^[ \t]+/, "", line)
  if (line == "" || substr(line, 1, 1) == "#") return 0
  i = match(line, /[ \t]/)
  if (i) { K = substr(line, 1, i - 1); V = substr(line, i) } else { K = line; V = "" }
  sub(/^[ \t]+/, "", V); sub(/[ \t]+$/, "", V)
  if (length(V) >= 2 && substr(V, 1, 1) == "\"" && substr(V, length(V), 1) == "\"") V = substr(V, 2, length(V) - 2)
  return 1
}
function esp_path(p) { gsub(/\\/, "/", p); if (substr(p, 1, 1) != "/") p = "/" p; return p }
'

# Newest first: by the last run of digits in the id (by length, then bytes), then by id.
list=$(
  for f in "$dir"/*.conf; do
    [ -f "$f" ] || continue
    id=${f##*/}
    id=${id%.conf}
    printf '%s\n' "$id"
  done | awk '{
    n = ""
    if (match($0, /[0-9]+[^0-9]*$/)) { n = substr($0, RSTART); sub(/[^0-9]+$/, "", n); sub(/^0+/, "", n) }
    printf "%d\t%s\t%s\n", length(n), n, $0
  }' | sort -t "$tab" -k1,1nr -k2,2r -k3,3 | cut -f3-
)

conf=$esp/loader/loader.conf
default= timeout=
if [ -f "$conf" ]; then
  # Last one wins, as in nixqimg; values never hold a newline.
  default=$(awk "$kv_awk"'kv($0) && K == "default" { v = V } END { printf "%s", v }' "$conf")
  timeout=$(awk "$kv_awk"'kv($0) && K == "timeout" { v = V } END { printf "%s", v }' "$conf")
fi

check_path() { # what path
  case $2 in
    *[" $tab"]*) why=$why"$at: $1 $2 has a blank, which SYSLINUX paths cannot have$nl" ;;
    *) [ -f "$esp$2" ] || why=$why"$at: $1 $2 is missing from the ESP$nl" ;;
  esac
}

problems=0 total=0 ok_ids= blocks=
nl='
'
while IFS= read -r id; do
  [ -n "$id" ] || continue
  total=$((total + 1))
  at=loader/entries/$id.conf
  parsed=$(awk "$kv_awk"'
    kv($0) {
      if (K == "title") t = V
      else if (K == "version") v = V
      else if (K == "linux") { l = esp_path(V); hl = 1 }
      else if (K == "initrd") i[ni++] = esp_path(V)
      else if (K == "options") { o = no++ ? o " " V : V }
    }
    END {
      printf "T\t%s\nV\t%s\n", t, v
      if (hl) printf "L\t%s\n", l
      for (k = 0; k < ni; k++) printf "I\t%s\n", i[k]
      printf "O\t%s\n", o
    }' "$dir/$id.conf")
  title= version= linux= has_linux= initrds= options= why=
  while IFS= read -r line; do
    tag=${line%%"$tab"*}
    val=${line#*"$tab"}
    case $tag in
      T) title=$val ;;
      V) version=$val ;;
      L) linux=$val has_linux=1 ;;
      I) initrds=$initrds$val$nl ;;
      O) options=$val ;;
    esac
  done <<EOF
$parsed
EOF
  case $id in *[" $tab"]*) why=$why"$at: the entry's name has a blank, which a SYSLINUX label cannot have$nl" ;; esac
  if [ -z "$has_linux" ]; then
    why=$why"$at: no linux line (SYSLINUX boots only Linux kernels)$nl"
  else
    check_path kernel "$linux"
  fi
  initrd_list=
  while IFS= read -r i; do
    [ -n "$i" ] || continue
    check_path initrd "$i"
    case $i in *,*) why=$why"$at: initrd $i has a comma, which SYSLINUX's INITRD list cannot hold$nl" ;; esac
    initrd_list=${initrd_list:+$initrd_list,}$i
  done <<EOF
$initrds
EOF
  if [ -n "$why" ]; then
    printf '%s' "$why" | while IFS= read -r w; do echo "$me: $w (entry left out of syslinux.cfg)" >&2; done
    problems=$((problems + 1))
    continue
  fi
  ok_ids=$ok_ids$id$nl
  [ -n "$title" ] || title=$id
  block="${nl}LABEL $id$nl  MENU LABEL $title"
  [ -z "$version" ] || block="$block ($version)"
  block="$block$nl  LINUX $linux$nl"
  [ -z "$initrd_list" ] || block="$block  INITRD $initrd_list$nl"
  [ -z "$options" ] || block="$block  APPEND $options$nl"
  blocks=$blocks$block
done <<EOF
$list
EOF

if [ -z "$ok_ids" ]; then
  echo "$me: $dir: no bootable entry, syslinux.cfg left as it was (run it after systemd-boot has written its entries)" >&2
  exit 1
fi

# The default: loader.conf's, with or without .conf, `*`/`?` globs (other pattern characters are
# literal), else the newest.
chosen=
if [ -n "$default" ]; then
  pat=$(printf '%s' "${default%.conf}" | sed 's/[][\\]/\\&/g')
  while IFS= read -r id; do
    [ -n "$id" ] || continue
    # shellcheck disable=SC2254 # the pattern is meant to glob
    case $id in $pat) chosen=$id; break ;; esac
  done <<EOF
$ok_ids
EOF
fi
[ -n "$chosen" ] || chosen=${ok_ids%%"$nl"*}

prompt=0 tenths=0
case $timeout in
  menu-force) prompt=1 ;;
  *[!0-9]* | '') ;;
  *)
    n=$(printf '%s' "$timeout" | sed 's/^0*//')
    if [ -z "$n" ]; then :
    elif [ ${#n} -gt 5 ]; then prompt=1 tenths=35996
    else prompt=1 tenths=$((n * 10)); [ "$tenths" -le 35996 ] || tenths=35996
    fi ;;
esac

out=$esp/syslinux.cfg
tmp=$esp/.syslinux.cfg.tmp
if {
  echo "# Written by nixqimg bootloader sync from loader/entries: changes here are overwritten."
  printf 'SERIAL 0 115200\nPROMPT %s\nTIMEOUT %s\nDEFAULT %s\n' "$prompt" "$tenths" "$chosen"
  printf '%s' "$blocks"
} >"$tmp" && mv -f "$tmp" "$out"; then
  :
else
  rm -f "$tmp"
  echo "$me: cannot write $out" >&2
  exit 1
fi

if [ "$problems" -gt 0 ]; then
  echo "$me: $problems of $total entries left out of $out (see the lines above; BIOS boots only what syslinux.cfg lists)" >&2
  exit 1
fi
