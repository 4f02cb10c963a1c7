#!/usr/bin/env bash
# The runtime stage's user and data directory, prepared in the builder stage so the runtime stage
# needs no RUN at all:
#   deploy/image/accounts.sh /staging
# writes /staging/etc/passwd and /staging/etc/group (the base image's, plus user and group
# braid 10001, home /var/lib/braid, no login shell) and an empty /staging/var/lib/braid, which the
# Dockerfile copies into the runtime stage (the directory owned by 10001). Both stages use the same
# base image, so the files are the runtime stage's own plus one line each.
#
#   accounts.sh ROOT [ETC]   ETC: where passwd and group are read (default /etc)
set -euo pipefail

root=${1:?usage: accounts.sh ROOT [ETC]}
etc=${2:-/etc}
uid=10001
name=braid

mkdir -p "$root/etc" "$root/var/lib/braid"
for file in passwd group; do
    if grep -q "^$name:" "$etc/$file" || grep -q ":x:$uid:" "$etc/$file"; then
        echo "accounts.sh: $etc/$file already has $name or id $uid" >&2
        exit 2
    fi
done
cp "$etc/passwd" "$root/etc/passwd"
cp "$etc/group" "$root/etc/group"
echo "$name:x:$uid:$uid:Braid:/var/lib/braid:/usr/sbin/nologin" >>"$root/etc/passwd"
echo "$name:x:$uid:" >>"$root/etc/group"
chmod 0644 "$root/etc/passwd" "$root/etc/group"
chmod 0750 "$root/var/lib/braid"
