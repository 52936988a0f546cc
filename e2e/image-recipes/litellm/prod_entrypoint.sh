#!/bin/sh
# Plays the part of upstream's docker/prod_entrypoint.sh in its default mode: the container's arguments
# go to the litellm CLI unchanged (upstream's optional supervisord/ddtrace/newrelic modes are not built).
exec litellm "$@"
