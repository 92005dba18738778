# Sourced by the deploy scripts: requests to the RabbitMQ management API (RABBITMQ_URL) as
# RABBITMQ_ADMIN_USER. rabbitmq_api.py writes each request as a curl config (URL, credentials, JSON
# body built by json.dumps), and curl reads it on stdin: no password ever reaches a command line,
# where ps shows it to every user of the machine.
: "${RABBITMQ_URL:?set RABBITMQ_URL}" "${RABBITMQ_ADMIN_USER:?set RABBITMQ_ADMIN_USER}"
: "${RABBITMQ_ADMIN_PASSWORD:?set RABBITMQ_ADMIN_PASSWORD}"
api_lib="$(dirname "$0")/rabbitmq_api.py"
api_script=$(basename "$0")
api_newline='
'

# request METHOD [--json OBJECT] [--set FIELD=VALUE] [--set-env FIELD=VARIABLE]... -- SEGMENT...
# Sets $status (200, 404...) and $answer (the body). Exits if RabbitMQ cannot be reached.
request() {
  config=$(python3 "$api_lib" request "$@") || exit 2
  answer=$(printf '%s\n' "$config" | curl -sS -w "${api_newline}%{http_code}" -K -) || exit 1
  status=${answer##*"$api_newline"}
  answer=${answer%"$api_newline"*}
}

# api METHOD ... -- SEGMENT...: a request that must succeed; anything else ends the script.
api() {
  request "$@"
  succeeded "$@"
}

# succeeded METHOD ... -- SEGMENT...: ends the script, saying why, unless the last request got a 2xx.
succeeded() {
  case $status in 2??) return 0 ;; esac
  case $status in
    401 | 403) hint=" (RABBITMQ_ADMIN_USER and RABBITMQ_ADMIN_PASSWORD must be an administrator's)" ;;
    *) hint= ;;
  esac
  echo "$api_script: $1 $(api_path "$@") answered HTTP $status: $answer$hint" >&2
  exit 1
}

# The segments after --, as a path to show.
api_path() {
  shown=
  after=
  for arg; do
    if [ -n "$after" ]; then shown="$shown/$arg"; elif [ "$arg" = -- ]; then after=1; fi
  done
  echo "${shown#/}"
}

vhost=$(python3 "$api_lib" vhost)
