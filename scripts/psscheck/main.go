// Command psscheck evaluates pod templates against a Kubernetes Pod Security Standard level with
// the real admission checks (k8s.io/pod-security-admission/policy), for the deployment tests.
//
// Stdin: a JSON list of {"name": ..., "metadata": ObjectMeta, "spec": PodSpec}. Stdout: a JSON
// list of {"name": ..., "allowed": bool, "reasons": [...]}, in the same order.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

type podTemplate struct {
	Name     string            `json:"name"`
	Metadata metav1.ObjectMeta `json:"metadata"`
	Spec     corev1.PodSpec    `json:"spec"`
}

type result struct {
	Name    string   `json:"name"`
	Allowed bool     `json:"allowed"`
	Reasons []string `json:"reasons"`
}

func main() {
	level := flag.String("level", "restricted", "privileged, baseline or restricted")
	version := flag.String("version", "latest", "the policy version, as v1.N or latest")
	flag.Parse()
	if err := run(*level, *version, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "psscheck:", err)
		os.Exit(2)
	}
}

func run(levelName, versionName string, in io.Reader, out io.Writer) error {
	level, err := api.ParseLevel(levelName)
	if err != nil {
		return err
	}
	version, err := api.ParseVersion(versionName)
	if err != nil {
		return err
	}
	evaluator, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		return err
	}
	raw, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	// A misspelled field would otherwise be dropped silently and the check would pass on less.
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var pods []podTemplate
	if err := dec.Decode(&pods); err != nil {
		return fmt.Errorf("reading pod templates: %w", err)
	}
	lv := api.LevelVersion{Level: level, Version: version}
	results := make([]result, 0, len(pods))
	for i := range pods {
		agg := policy.AggregateCheckResults(evaluator.EvaluatePod(lv, &pods[i].Metadata, &pods[i].Spec))
		reasons := make([]string, len(agg.ForbiddenReasons))
		for j, reason := range agg.ForbiddenReasons {
			reasons[j] = reason
			if agg.ForbiddenDetails[j] != "" {
				reasons[j] += " (" + agg.ForbiddenDetails[j] + ")"
			}
		}
		results = append(results, result{Name: pods[i].Name, Allowed: agg.Allowed, Reasons: reasons})
	}
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(results)
}
