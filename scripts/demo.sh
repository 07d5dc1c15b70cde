#!/usr/bin/env bash
# The main job on the embedded default: a local PostgreSQL node in the `local` storage,
# some data written into it, and the node list. NEON_HOME defaults to ./.neon-demo here so
# the demo never touches ~/.neon; pass NEON_HOME to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_HOME="$PWD/.neon-demo"
# As root, PostgreSQL runs as the postgres account, which must be able to enter every parent
# of the home; pg-neon never opens one up (a clone under /root is not reachable).
if [ "$(id -u)" -eq 0 ] && ! runuser -u "${NEON_PG_USER:-postgres}" -- test -x "$PWD" 2>/dev/null; then
    DEFAULT_HOME=/var/lib/neon-demo
fi
export NEON_HOME="${NEON_HOME:-$DEFAULT_HOME}"
NEON=.venv/bin/neon
PSQL="${NEON_PG_BIN:-/usr/lib/postgresql/15/bin}/psql"

echo "== NEON_HOME=$NEON_HOME"
$NEON pageserver start
if ! $NEON pg show demo >/dev/null 2>&1; then
    $NEON pg create -n demo
else
    $NEON pg start demo
fi
CONN=$($NEON pg show demo --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["connstr"])')
echo "== connecting with: psql \"$CONN\""
"$PSQL" "$CONN" -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE TABLE IF NOT EXISTS movies (id serial PRIMARY KEY, title text NOT NULL, year int);
INSERT INTO movies (title, year)
SELECT 'movie #' || g, 1950 + g % 70 FROM generate_series(1, 1000) g;
SQL
"$PSQL" "$CONN" -X -At -c "SELECT count(*) || ' rows in movies' FROM movies"
TAG="before-$(date +%s)"
echo "== neon snapshot create demo@$TAG; then delete every row and roll back"
$NEON snapshot create "demo@$TAG"
"$PSQL" "$CONN" -X -q -c "DELETE FROM movies"
"$PSQL" "$CONN" -X -At -c "SELECT count(*) || ' rows after DELETE' FROM movies"
$NEON pg checkout "demo@$TAG"
"$PSQL" "$CONN" -X -At -c "SELECT count(*) || ' rows after checkout' FROM movies"
echo "== neon snapshot list"
$NEON snapshot list
echo "== neon pg list"
$NEON pg list
echo "== neon storage list"
$NEON storage list
echo "== neon pageserver status"
$NEON pageserver status
echo
echo "The node keeps running. Stop everything with:"
echo "  NEON_HOME=$NEON_HOME $NEON pg stop demo && NEON_HOME=$NEON_HOME $NEON pageserver stop"
