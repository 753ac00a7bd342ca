#!/usr/bin/env bash
# Installs the tansu Kafka-protocol broker that the Kafka integration tests
# start (ADR 004), once per machine: the binary is cached under
# ~/.cache/segstream-tools and reused by later runs. Prints its path.
# Building it takes ~10-12 minutes on 2 cores.
set -euo pipefail
version=0.6.0
root="$HOME/.cache/segstream-tools/tansu-$version"
bin="$root/bin/tansu"
if [[ ! -x "$bin" ]] || ! "$bin" --version >/dev/null 2>&1; then
  echo "installing tansu $version into $root (first run on this machine only)" >&2
  env -u CARGO_TARGET_DIR cargo install tansu --version "$version" --locked --quiet \
    --no-default-features --features dynostore,libsql --root "$root" >&2
fi
echo "$bin"
