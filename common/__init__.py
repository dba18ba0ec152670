"""Shared skeleton of the tdagg servers: framing, bucket clock, flush loop and database sink."""
