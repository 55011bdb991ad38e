#![no_std]
// This file exists so that agent/build.rs can list the probe as a build-dependency (cargo then
// rebuilds the agent when the probe changes), as in aya-template.
