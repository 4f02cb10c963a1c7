#!/usr/bin/env bash
# Make the Secrets the deploy/k8s overlays mount, with openssl and `braid` (no kubectl needed
# to make them): each Secret is a directory DIR/<secret-name>/ of files, one per key, and
# the `kubectl create secret` commands that load them are printed (or run, with --apply).
#
#   deploy/k8s/make-secrets.sh [--namespace braid] [--days 825] [--apply] [--force] DIR
#
# DIR/braid-internal-tls/  tls.crt tls.key ca.crt  mutual TLS between routers and shard
#                          servers: one certificate (CN and DNS name braid-internal,
#                          serverAuth + clientAuth) from the internal CA
# DIR/braid-nats-tls/      ca.crt tls.crt tls.key  the NATS servers' certificate (client port
#                          and routes), named for every pod of the headless Service braid-nats
# DIR/braid-nats-creds/    braid.nk braid.pub      Braid's NATS user: the nkey seed (clients)
#                          and its public key (the NATS servers' authorization)
# DIR/braid-tls/           tls.crt tls.key ca.crt  the client-facing API (routers or the
#                          standalone server), named for the Service `braid`
# DIR/braid-api-keys/      keys.json               hashed API keys: `admin` and `index-job`
# DIR/braid-index-key/     api-key                 the bulk job's key (role write)
# DIR/admin.key                                    the admin key, for you (in no Secret)
# DIR/private/                                     the three CAs' private keys: keep them
#                                                  off the cluster, to sign later certificates
#
# `braid` must be on PATH (or set BRAID=/path/to/braid): `braid cluster nkey` makes the
# nkey, `braid keys add` the API keys. Nothing is overwritten without --force.
set -euo pipefail

namespace=braid
days=825
apply=0
force=0
dir=""
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace="${2:?--namespace needs a value}"; shift 2 ;;
    --namespace=*) namespace="${1#*=}"; shift ;;
    --days) days="${2:?--days needs a value}"; shift 2 ;;
    --days=*) days="${1#*=}"; shift ;;
    --apply) apply=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage ;;
    -*) echo "make-secrets.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$dir" ] || usage; dir="$1"; shift ;;
  esac
done
[ -n "$dir" ] || usage
case "$namespace" in
  *[!a-z0-9-]*|-*|*-|"") echo "make-secrets.sh: --namespace must be a DNS label, got '$namespace'" >&2; exit 2 ;;
esac
braid="${BRAID:-braid}"
command -v "$braid" >/dev/null || { echo "make-secrets.sh: '$braid' not found: put braid on PATH or set BRAID" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-secrets.sh: openssl not found" >&2; exit 2; }
if [ -e "$dir/braid-internal-tls" ] && [ "$force" -ne 1 ]; then
  echo "make-secrets.sh: $dir already holds secrets (--force makes new ones)" >&2
  exit 2
fi

umask 077
mkdir -p "$dir/private"
rm -rf "$dir"/braid-internal-tls "$dir"/braid-nats-tls "$dir"/braid-nats-creds "$dir"/braid-tls \
  "$dir"/braid-api-keys "$dir"/braid-index-key "$dir/admin.key"
mkdir -p "$dir"/braid-internal-tls "$dir"/braid-nats-tls "$dir"/braid-nats-creds "$dir"/braid-tls \
  "$dir"/braid-api-keys "$dir"/braid-index-key
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# new_key FILE: an ECDSA P-256 private key, PKCS#8 PEM.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# new_ca NAME CN: a self-signed CA in private/NAME-ca.key and NAME-ca.crt.
new_ca() {
  new_key "$dir/private/$1-ca.key"
  openssl req -x509 -new -sha256 -days "$days" -key "$dir/private/$1-ca.key" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/private/$1-ca.crt" 2>/dev/null
}

# new_leaf CA OUTDIR CN SANS: OUTDIR/tls.key, tls.crt (serverAuth + clientAuth), ca.crt.
new_leaf() {
  local ca="$1" out="$2" cn="$3" sans="$4"
  new_key "$out/tls.key"
  openssl req -new -sha256 -key "$out/tls.key" -subj "/CN=$cn" -out "$work/leaf.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$sans" >"$work/leaf.ext"
  openssl x509 -req -sha256 -days "$days" -in "$work/leaf.csr" -CA "$dir/private/$ca-ca.crt" \
    -CAkey "$dir/private/$ca-ca.key" -CAcreateserial -CAserial "$work/$ca.srl" -extfile "$work/leaf.ext" \
    -out "$out/tls.crt" 2>/dev/null
  cp "$dir/private/$ca-ca.crt" "$out/ca.crt"
}

svc="svc.cluster.local"
new_ca internal "braid internal CA"
new_leaf internal "$dir/braid-internal-tls" braid-internal "DNS:braid-internal"

new_ca nats "braid NATS CA"
new_leaf nats "$dir/braid-nats-tls" braid-nats \
  "DNS:braid-nats,DNS:*.braid-nats,DNS:*.braid-nats.$namespace,DNS:*.braid-nats.$namespace.svc,DNS:*.braid-nats.$namespace.$svc,DNS:localhost,IP:127.0.0.1"

new_ca api "braid API CA"
new_leaf api "$dir/braid-tls" braid \
  "DNS:braid,DNS:braid.$namespace,DNS:braid.$namespace.svc,DNS:braid.$namespace.$svc,DNS:*.braid-headless.$namespace.$svc,DNS:localhost,IP:127.0.0.1"

"$braid" cluster nkey "$dir/braid-nats-creds/braid.nk" >"$dir/braid-nats-creds/braid.pub"
grep -q '^U[A-Z2-7]\{55\}$' "$dir/braid-nats-creds/braid.pub" \
  || { echo "make-secrets.sh: '$braid cluster nkey' printed no public user nkey" >&2; exit 1; }

keys="$dir/braid-api-keys/keys.json"
"$braid" keys add --file "$keys" --name admin --role admin >"$dir/admin.key" 2>/dev/null
job_key="$("$braid" keys add --file "$keys" --name index-job --role write 2>/dev/null)"
# The Secret holds the key exactly: no trailing newline in the environment variable.
printf '%s' "$job_key" >"$dir/braid-index-key/api-key"

secrets=(braid-internal-tls braid-nats-tls braid-nats-creds braid-tls braid-api-keys braid-index-key)
echo "# secrets for namespace $namespace in $dir (CA keys in $dir/private, the admin key in $dir/admin.key)" >&2
if [ "$apply" -eq 1 ]; then
  command -v kubectl >/dev/null || { echo "make-secrets.sh: --apply needs kubectl" >&2; exit 2; }
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
fi
for name in "${secrets[@]}"; do
  cmd=(kubectl -n "$namespace" create secret generic "$name" "--from-file=$dir/$name/")
  printf '%q ' "${cmd[@]}"
  echo
  if [ "$apply" -eq 1 ]; then
    "${cmd[@]}" --dry-run=client -o yaml | kubectl apply -f -
  fi
done
