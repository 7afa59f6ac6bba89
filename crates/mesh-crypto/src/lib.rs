//! NuroPb message encryption (spec §10). Implementation pending.
