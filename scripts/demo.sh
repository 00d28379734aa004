#!/usr/bin/env bash
# The README's run command: installs what is missing, builds the gateway, starts a
# demo upstream (nginx serving JSON on 127.0.0.1:3001 and :3002) and runs the
# gateway in the foreground on 127.0.0.1:8080 with demo/gateway.yaml. Ctrl-C stops
# both. Everything it writes goes to .demo/ in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh
cmake -S "$root" -B "$root/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$root/build" -j"$(nproc 2>/dev/null || echo 2)"

run="$root/.demo"
mkdir -p "$run/nginx/logs"
cat > "$run/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $run/nginx/nginx.pid;
error_log $run/nginx/logs/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  default_type application/json;
  server {
    listen 127.0.0.1:3001;
    listen 127.0.0.1:3002;
    location = /api/blueprints {
      if (\$request_method = GET) { return 200 '[{"id":1,"name":"web-tier"},{"id":2,"name":"data-tier"}]\n'; }
      return 201 '{"created":true,"served_by":\$server_port}\n';
    }
    location ~ ^/api/blueprints/(\d+)$ { return 200 '{"id":\$1,"name":"blueprint-\$1","served_by":\$server_port}\n'; }
    location / { return 200 '{"path":"\$uri","served_by":\$server_port}\n'; }
  }
}
NGINX

nginx -p "$run/nginx" -c "$run/nginx/nginx.conf" &
nginx_pid=$!
cleanup() { kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 50); do
  if curl -fs -o /dev/null http://127.0.0.1:3001/api/blueprints; then break; fi
  sleep 0.1
done

cat <<MSG
Demo upstream on 127.0.0.1:3001 and :3002. Starting the gateway on 127.0.0.1:8080.
Try, from another terminal:
  curl -i http://127.0.0.1:8080/api/blueprints
  curl -i http://127.0.0.1:8080/api/blueprints/7
  curl -i -X POST -d '{"name":"x"}' http://127.0.0.1:8080/api/blueprints
  curl -s http://127.0.0.1:8080/metrics | grep http_requests_total
  curl -s -X POST -H 'Authorization: Bearer demo-token' http://127.0.0.1:9901/admin/reload
Ctrl-C stops it.
MSG
"$root/build/gateway" -c "$root/demo/gateway.yaml"
