package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestStateDir: a state dir another user could change is refused with one
// clear error; a missing one is created 0700.
func TestStateDir(t *testing.T) {
	uid := os.Geteuid()
	mkdir := func(mode os.FileMode) func(t *testing.T, base string) string {
		return func(t *testing.T, base string) string {
			d := filepath.Join(base, "state")
			if err := os.Mkdir(d, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(d, mode); err != nil { // umask-free
				t.Fatal(err)
			}
			return d
		}
	}
	tests := []struct {
		name    string
		setup   func(t *testing.T, base string) string
		uid     int    // the running user, as checkStateDir sees it
		wantErr string // "" for accepted
	}{
		{"missing: created", func(t *testing.T, base string) string { return filepath.Join(base, "a", "state") }, uid, ""},
		{"private", mkdir(0o700), uid, ""},
		{"private, read by others", mkdir(0o755), uid, ""},
		{"group-writable", mkdir(0o770), uid, "writable by its group or by others (mode 0770)"},
		{"world-writable", mkdir(0o757), uid, "writable by its group or by others (mode 0757)"},
		{"world-writable, sticky", mkdir(0o1777), uid, "writable by its group or by others"},
		{"another owner", mkdir(0o700), uid + 1, "is owned by uid"},
		{"symlink to a private dir", func(t *testing.T, base string) string {
			d := mkdir(0o700)(t, base)
			l := filepath.Join(base, "link")
			if err := os.Symlink(d, l); err != nil {
				t.Fatal(err)
			}
			return l
		}, uid, "is a symlink"},
		{"a file", func(t *testing.T, base string) string {
			f := filepath.Join(base, "file")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return f
		}, uid, "is not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.setup(t, t.TempDir())
			got, err := prepareStateDirAs(dir, tt.uid)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("prepareStateDir(%s) = %q, %v; want one line containing %q", dir, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("prepareStateDir(%s): %v", dir, err)
			}
			fi, err := os.Lstat(got)
			if err != nil {
				t.Fatal(err)
			}
			if !fi.IsDir() || fi.Mode().Perm()&0o022 != 0 {
				t.Errorf("%s: mode %v", got, fi.Mode())
			}
			if tt.name == "missing: created" && fi.Mode().Perm() != 0o700 {
				t.Errorf("created with mode %04o, want 0700", fi.Mode().Perm())
			}
		})
	}
}
