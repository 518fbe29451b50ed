#!/usr/bin/env bash
# Functions that make sure the local services pinq needs are running on this machine:
# PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672. Sourced by deploy/up.sh
# and deploy/test.sh. Each function starts its service only if it does not answer, and
# installs it from Debian's packages only if it is missing altogether.

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  echo "error: $3 did not open 127.0.0.1:$1 within $2 s" >&2
  return 1
}

apt_install() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: $* is not installed; install it (as root: apt-get install $*)" >&2
    return 1
  fi
  echo "installing $* from Debian's packages" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

ensure_postgres() {
  port_open 5432 && return 0
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "starting PostgreSQL $version" >&2
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  wait_port 5432 60 PostgreSQL
  # pinq's default DATABASE_URL connects as `postgres` without a password over TCP.
  local hba
  hba=$(ls /etc/postgresql/"$version"/main/pg_hba.conf)
  if ! grep -Eq '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    echo "note: PostgreSQL must trust local TCP connections, or set DATABASE_URL with a password" >&2
  fi
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached >&2 || true
  rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
  wait_port 5672 120 RabbitMQ
}

ensure_node() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && return 0
  apt_install nodejs npm
}
