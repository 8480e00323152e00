package spoa

// WatchName lets the integration test query the agent-cache entry the
// watch uses.
var WatchName = watchName
