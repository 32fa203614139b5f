"""The step cycle: admit a batch of messages, run each guest for one step, decide, and write
the outcome in one transaction over the store port. The fleet's workers, `stepfleet run`, the
module-move dry runs and the property tests all drive this one cycle."""
