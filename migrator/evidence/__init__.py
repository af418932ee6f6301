"""What an independent monitor checks: the audit chain and its heads (`chain`), the signed
manifests (`manifest`), keyed pseudonyms (`pseudonym`), `migrator audit` (`audit`) and
its HTML report and records of processing (`report`)."""
