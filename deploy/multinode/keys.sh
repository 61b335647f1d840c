#!/usr/bin/env bash
# CurveZMQ keys for a multi-node run, on a shared filesystem:
#   deploy/multinode/keys.sh /shared/keys
# writes server.key / server.key_secret (hub and grader nodes bind with it), client.key /
# client.key_secret (every connecting process), and clients/client.key (the servers' allow-list).
# The config names them: network.curve_server_key, curve_client_key, curve_server_public,
# curve_allowed_clients. Keep the *_secret files readable by the job's user only.
set -euo pipefail
DIR="${1:?usage: keys.sh DIR}"
mkdir -p "$DIR/clients"
minirl-async keys "$DIR" --name server
minirl-async keys "$DIR" --name client
cp "$DIR/client.key" "$DIR/clients/client.key"
chmod 600 "$DIR"/*.key_secret
echo "keys in $DIR"
