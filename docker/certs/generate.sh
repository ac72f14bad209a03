#!/usr/bin/env bash
# Makes the TLS material for a SuperLink and the authentication key pairs for SuperNodes.
#
# Why one script for both: the compose demo, the multi-host setup in docs/deployment.md and the
# deployment test (tests/deployment/) all use the same files with the same names, so what the
# test proves is what a user runs.
#
#   generate.sh tls  [--out DIR] [--san LIST] [--days N] [--force]
#       CA (ca.key, ca.crt) and a server key and certificate signed by it (server.key,
#       server.pem) in DIR/tls. The server certificate always carries DNS:localhost and
#       IP:127.0.0.1 (the SuperLink's own SuperExec reaches the Runtime API there) plus LIST,
#       a comma-separated list of SANs such as "DNS:superlink,DNS:fl.example.org,IP:203.0.113.7".
#       Give every name and address the SuperNodes and the flwr CLI use to reach the SuperLink.
#       Also writes DIR/tls/superexec.secret: the shared secret with which the SuperLink's
#       SuperExec authenticates (--superexec-auth-secret-file); it never leaves that host.
#
#   generate.sh keys [--out DIR] [--names "site-a site-b"] [--supernodes N] [--force]
#       One ECDSA P-384 key pair per SuperNode in DIR/keys: NAME (private, OpenSSH format,
#       stays on the site) and NAME.pub (public, sent to the SuperLink operator, who registers
#       it with `flwr supernode register DIR/keys/NAME.pub <connection>`).
#       Default names: supernode-1 .. supernode-N (N=2).
#
#   generate.sh all  [options of both]      (the default) both of the above.
#
# DIR defaults to docker/certs/generated (ignored by git). Existing files are never
# overwritten unless --force is given: replacing a CA silently would lock every SuperNode out.
# Needs openssl; the key pairs use ssh-keygen, or Python's `cryptography` (a dependency of
# flwr) where ssh-keygen is missing.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${script_dir}/generated"
san=""
days=365
names=""
count=2
force=0
command="all"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "generate.sh: $*" >&2
    exit 2
}

if [[ $# -gt 0 && "$1" != -* ]]; then
    command="$1"
    shift
fi
case "${command}" in
    tls | keys | all) ;;
    -h | --help | help)
        usage
        exit 0
        ;;
    *) die "unknown command '${command}' (expected tls, keys or all; see --help)" ;;
esac

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --san) san="${2:?--san needs a list such as DNS:superlink,IP:10.0.0.5}"; shift 2 ;;
        --days) days="${2:?--days needs a number}"; shift 2 ;;
        --names) names="${2:?--names needs a space-separated list}"; shift 2 ;;
        --supernodes) count="${2:?--supernodes needs a number}"; shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ "${days}" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '${days}'"
[[ "${count}" =~ ^[1-9][0-9]*$ ]] || die "--supernodes must be a positive integer, got '${count}'"
if [[ -z "${names}" ]]; then
    names="$(seq -f 'supernode-%g' 1 "${count}" | tr '\n' ' ')"
fi

# Refuses to replace an existing file unless --force was given.
guard() {
    local path
    for path in "$@"; do
        if [[ -e "${path}" && "${force}" -eq 0 ]]; then
            die "${path} exists; pass --force to replace it (every party using it must then get the new one)"
        fi
    done
}

make_tls() {
    local dir="${out}/tls"
    mkdir -p "${dir}"
    local files=(ca.key ca.crt server.key server.pem superexec.secret) name
    for name in "${files[@]}"; do
        guard "${dir}/${name}"
    done
    for name in "${files[@]}"; do
        rm -f "${dir}/${name}"
    done

    local all_san="DNS:localhost,IP:127.0.0.1"
    if [[ -n "${san}" ]]; then
        all_san="${all_san},${san}"
    fi
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '${work}'" RETURN

    (
        umask 077
        openssl ecparam -name secp384r1 -genkey -noout -out "${dir}/ca.key"
        openssl ecparam -name secp384r1 -genkey -noout -out "${dir}/server.key"
        # Read as exact raw bytes by Flower: no trailing newline.
        openssl rand -hex 32 | tr -d '\n' >"${dir}/superexec.secret"
    )
    openssl req -x509 -new -key "${dir}/ca.key" -sha384 -days "${days}" \
        -subj "/CN=robustmerge-fl CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "${dir}/ca.crt" 2>/dev/null
    openssl req -new -key "${dir}/server.key" -subj "/CN=superlink" -out "${work}/server.csr"
    cat >"${work}/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=${all_san}
EOF
    openssl x509 -req -in "${work}/server.csr" -CA "${dir}/ca.crt" -CAkey "${dir}/ca.key" \
        -CAcreateserial -CAserial "${work}/ca.srl" -days "${days}" -sha384 \
        -extfile "${work}/server.ext" -out "${dir}/server.pem" 2>/dev/null
    chmod 644 "${dir}/ca.crt" "${dir}/server.pem"
    openssl verify -CAfile "${dir}/ca.crt" "${dir}/server.pem" >/dev/null
    echo "TLS: ${dir}/{ca.crt,ca.key,server.pem,server.key,superexec.secret} (SAN ${all_san})"
}

make_key_pair() {
    local path="$1" name="$2"
    if command -v ssh-keygen >/dev/null 2>&1 && [[ "${GENERATE_NO_SSH_KEYGEN:-0}" != 1 ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "${name}" -f "${path}"
    else
        python3 - "${path}" "${name}" <<'EOF'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, name = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
public = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(private)
with open(path + ".pub", "wb") as f:
    f.write(public + b" " + name.encode() + b"\n")
EOF
    fi
}

make_keys() {
    local dir="${out}/keys" name
    mkdir -p "${dir}"
    for name in ${names}; do
        [[ "${name}" =~ ^[A-Za-z0-9._-]+$ ]] || die "key name '${name}' must match [A-Za-z0-9._-]+"
        guard "${dir}/${name}" "${dir}/${name}.pub"
        rm -f "${dir}/${name}" "${dir}/${name}.pub"
        make_key_pair "${dir}/${name}" "${name}"
        echo "SuperNode key pair: ${dir}/${name} (private, stays on the site), ${dir}/${name}.pub"
    done
}

case "${command}" in
    tls) make_tls ;;
    keys) make_keys ;;
    all) make_tls; make_keys ;;
esac
