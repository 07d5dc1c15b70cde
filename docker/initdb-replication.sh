#!/bin/sh
# Run once by the postgres image at initdb: let the pageserver container replicate over the
# compose network with a password (SCRAM).
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
