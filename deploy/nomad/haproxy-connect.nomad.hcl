# A service ("web", standing for yours) and haproxy-connect as its Consul
# Connect sidecar: two tasks of one group, so they are placed, started,
# restarted and stopped together on the same client. Not run on Nomad in
# this repository's tests (no Nomad here): its test parses it and checks the
# settings below. Adapt names, ports, the upstream and the command lines.
#
# Why raw_exec for the sidecar, and what a crash of haproxy-connect costs,
# by driver (from Nomad's executor and driver source, v1.7 and later, and
# the Linux pid_namespaces(7) rule; check it on your version):
# - raw_exec: on a task restart Nomad SIGKILLs the task's process group.
#   haproxy-connect runs HAProxy in a session of its own, so HAProxy is
#   outside that group and keeps serving while the task restarts; the new
#   haproxy-connect adopts it on the same state dir (which lives in the
#   task's local/ dir, kept across restarts of the allocation). When the
#   task stops for good, Nomad also kills whatever is left in the task's
#   cgroup, after haproxy-connect has stopped HAProxy on kill_signal.
# - exec: the task runs in its own PID namespace by default
#   (default_pid_mode = "private"), where haproxy-connect is PID 1: when it
#   dies the kernel kills every process of the namespace, HAProxy too. With
#   pid_mode = "host" the task restart still destroys the task's container,
#   killing every process in its cgroup. Either way a controller crash
#   takes HAProxy down until the restart has started a new one.
# - docker: the same, through the container's PID 1.
# So only raw_exec gives fail-static across a controller crash. raw_exec is
# off by default on Nomad clients (plugin "raw_exec" { config { enabled =
# true } }) and runs the task as the Nomad agent's user unless `user` is
# set; set it to an unprivileged user.

job "web" {
  type = "service"

  group "web" {
    count = 1

    network {
      port "app" {}
      # The sidecar's public mTLS listener, registered below.
      port "public" {}
      # haproxy-connect's /metrics, /healthz and /readyz.
      port "stats" {}
    }

    # Applies to every task of the group (a sidecar task takes no restart
    # block of its own): restart in place, quickly and without giving up.
    # Each restart of haproxy-connect adopts the HAProxy it left.
    restart {
      attempts = 10
      interval = "1m"
      delay    = "1s"
      mode     = "delay"
    }

    # Registers the service and its connect-proxy registration with the
    # local Consul agent, under IDs this job knows, before the other tasks
    # start. Nomad's own service block cannot make a connect-proxy
    # registration other than for its Envoy integration.
    task "register" {
      driver = "raw_exec"
      lifecycle {
        hook = "prestart"
      }
      config {
        command = "/usr/local/bin/consul"
        args    = ["services", "register", "${NOMAD_TASK_DIR}/services.hcl"]
      }
      template {
        destination = "${NOMAD_TASK_DIR}/services.hcl"
        data        = <<EOH
services {
  id      = "web-{{ env "NOMAD_ALLOC_ID" }}"
  name    = "web"
  address = "{{ env "NOMAD_IP_app" }}"
  port    = {{ env "NOMAD_PORT_app" }}
  checks = [
    {
      name     = "web http"
      http     = "http://{{ env "NOMAD_ADDR_app" }}/health"
      interval = "5s"
      timeout  = "2s"
    },
  ]
}
services {
  kind    = "connect-proxy"
  id      = "web-sidecar-proxy-{{ env "NOMAD_ALLOC_ID" }}"
  name    = "web-sidecar-proxy"
  address = "{{ env "NOMAD_IP_public" }}"
  port    = {{ env "NOMAD_PORT_public" }}
  proxy {
    destination_service_name = "web"
    destination_service_id   = "web-{{ env "NOMAD_ALLOC_ID" }}"
    local_service_address    = "{{ env "NOMAD_IP_app" }}"
    local_service_port       = {{ env "NOMAD_PORT_app" }}
    upstreams {
      destination_name = "api"
      local_bind_port  = 9191
    }
  }
  checks = [
    {
      name     = "public listener"
      tcp      = "{{ env "NOMAD_ADDR_public" }}"
      interval = "5s"
    },
    {
      name          = "web alive"
      alias_service = "web-{{ env "NOMAD_ALLOC_ID" }}"
    },
  ]
}
EOH
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/consul-token"
        data        = "{{ with nomadVar \"nomad/jobs/web\" }}{{ .consul_token }}{{ end }}"
      }
      env {
        CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/consul-token"
      }
    }

    task "web" {
      driver = "raw_exec"
      config {
        command = "/usr/local/bin/web"
        args    = ["-listen", "${NOMAD_ADDR_app}"]
      }
    }

    # The sidecar. poststart, so the registration task has finished and the
    # service runs; sidecar = true, so Nomad restarts it when it exits and
    # stops it only after the main task, when the allocation stops.
    task "haproxy-connect" {
      driver = "raw_exec"
      # Not the Nomad agent's user (root): HAProxy needs no privilege to
      # bind ports from 1024 up.
      user = "haproxy-connect"
      lifecycle {
        hook    = "poststart"
        sidecar = true
      }
      config {
        command = "/usr/local/bin/haproxy-connect"
        args = [
          "-sidecar-for", "web-${NOMAD_ALLOC_ID}",
          # In the task's local/ dir: kept across task restarts, so a new
          # haproxy-connect finds and adopts the HAProxy the last one
          # left; created 0700 by haproxy-connect. The master socket path
          # in it must stay under 100 bytes: mind the client's data_dir.
          "-state-dir", "${NOMAD_TASK_DIR}/state",
          "-haproxy-bin", "/usr/sbin/haproxy",
          "-http-addr", "127.0.0.1:8500",
          "-stats-addr", "${NOMAD_ADDR_stats}",
          "-hard-stop-after", "5m",
          "-log-format", "json",
        ]
      }
      # SIGTERM is haproxy-connect's graceful stop: it stops HAProxy
      # (listeners close at once, in-flight requests get -stop-timeout,
      # 15 s by default) and exits. Nomad's default, SIGINT, does the same,
      # but say it. kill_timeout must exceed -stop-timeout and stay within
      # the client's max_kill_timeout (30 s by default); past it Nomad
      # SIGKILLs the task's process group, and then its cgroup.
      kill_signal  = "SIGTERM"
      kill_timeout = "25s"
      template {
        destination = "${NOMAD_SECRETS_DIR}/consul-token"
        data        = "{{ with nomadVar \"nomad/jobs/web\" }}{{ .consul_token }}{{ end }}"
      }
      env {
        CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/consul-token"
      }
      resources {
        cpu    = 200
        memory = 128
      }
    }

    # Takes both registrations out of Consul once the tasks have stopped.
    # Until then (and on a node that died) the proxy's TCP check takes it
    # out of callers' endpoints within its interval.
    task "deregister" {
      driver = "raw_exec"
      lifecycle {
        hook = "poststop"
      }
      config {
        command = "/bin/sh"
        args = ["-c", <<EOS
/usr/local/bin/consul services deregister -id "web-sidecar-proxy-$NOMAD_ALLOC_ID"
/usr/local/bin/consul services deregister -id "web-$NOMAD_ALLOC_ID"
EOS
        ]
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/consul-token"
        data        = "{{ with nomadVar \"nomad/jobs/web\" }}{{ .consul_token }}{{ end }}"
      }
      env {
        CONSUL_HTTP_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/consul-token"
      }
    }
  }
}
