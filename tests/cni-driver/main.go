// cni-driver drives CNI plugins through libcni, the library containerd and CRI-O call them with (Debian's
// golang-github-appc-cni-dev), so that nodemesh's tests exercise nodemesh-cni in a real chain exactly as a
// container runtime does: libcni reads the conflist, runs each plugin with the runtime's environment, passes
// prevResult along, caches results for CHECK and DEL, and checks versions.
//
//	cni-driver ADD|CHECK|DEL CONFLIST CONTAINER_ID NETNS K8S_NAMESPACE K8S_POD
//
// Plugin directories come from CNI_PATH, the result cache from CNI_CACHE_DIR. ADD prints the chain's result;
// a failure prints the plugin's error object ({"code","msg","details"}) and exits 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func fail(err error) {
	// libcni wraps the plugin's error object with the plugin's name; the runtime sees both.
	out := map[string]interface{}{"code": 999, "msg": err.Error()}
	var plugin *types.Error
	if errors.As(err, &plugin) {
		out = map[string]interface{}{"code": plugin.Code, "msg": err.Error(), "details": plugin.Details}
	}
	json.NewEncoder(os.Stdout).Encode(out)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 7 {
		fmt.Fprintln(os.Stderr, "usage: cni-driver ADD|CHECK|DEL CONFLIST CONTAINER_ID NETNS K8S_NAMESPACE K8S_POD")
		os.Exit(2)
	}
	command, conflist, containerID, netns, namespace, pod := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]
	list, err := libcni.ConfListFromFile(conflist)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), os.Getenv("CNI_CACHE_DIR"), nil)
	// The arguments containerd's CRI plugin passes for a pod sandbox.
	runtime := &libcni.RuntimeConf{
		ContainerID: containerID,
		NetNS:       netns,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", namespace},
			{"K8S_POD_NAME", pod},
			{"K8S_POD_INFRA_CONTAINER_ID", containerID},
			{"K8S_POD_UID", "uid-" + strings.ReplaceAll(pod, "/", "-")},
		},
	}
	ctx := context.Background()
	switch command {
	case "ADD":
		result, err := cni.AddNetworkList(ctx, list, runtime)
		if err != nil {
			fail(err)
		}
		if err := result.Print(); err != nil {
			fail(err)
		}
	case "CHECK":
		if err := cni.CheckNetworkList(ctx, list, runtime); err != nil {
			fail(err)
		}
	case "DEL":
		if err := cni.DelNetworkList(ctx, list, runtime); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", command)
		os.Exit(2)
	}
}
