.PHONY: demo test deps

# End-to-end local demo: broker, PKI, ingest, two fleets, summary.
demo:
	bash deploy/local/demo.sh

# Integration tests against a real broker.
test:
	bash deploy/local/test.sh

# Installs the tansu broker if missing.
deps:
	bash deploy/local/ensure-tansu.sh
