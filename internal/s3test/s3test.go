// Package s3test runs a real S3-compatible store on the loopback for
// kvmckpt's tests and benches: SeaweedFS (`weed server -s3`), which
// `make deps` builds from its Go module into the cache. Each Server has
// its own data directory, ports and credentials.
package s3test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kvmckpt/kvmckpt/internal/cachedir"
)

// Version is the SeaweedFS module version scripts/deps.sh builds; the
// binary is $KVMCKPT_CACHE/bin/weed-<Version>.
const Version = "v0.0.0-20261109003541-7506e5f91cd6"

// Credentials of every Server.
const (
	AccessKey = "kvmckpt-test"
	SecretKey = "kvmckpt-test-secret"
	Region    = "us-east-1"
)

// Binary returns the path of the weed binary, or an error saying how to
// get it.
func Binary() (string, error) {
	dir, err := cachedir.Dir()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "bin", "weed-"+Version)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("SeaweedFS %s not found at %s: run `make deps`", Version, p)
	}
	return p, nil
}

// Server is a running SeaweedFS with its S3 gateway.
type Server struct {
	// Endpoint is the S3 gateway's URL.
	Endpoint string
	dir      string
	ports    []int
	cmd      *exec.Cmd
	exited   chan struct{}
	log      *os.File
}

// Start starts a server with its data in dir (created if missing) and
// waits until it takes requests. Stop it with Stop.
func Start(dir string) (*Server, error) {
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, err
	}
	ports, err := freePorts(8)
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, ports: ports, Endpoint: fmt.Sprintf("http://127.0.0.1:%d", ports[6])}
	return s, s.start()
}

// Restart starts a stopped server again, on its data and ports.
func (s *Server) Restart() error { return s.start() }

func (s *Server) start() error {
	bin, err := Binary()
	if err != nil {
		return err
	}
	conf := filepath.Join(s.dir, "s3.json")
	ident := fmt.Sprintf(`{"identities":[{"name":"kvmckpt","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]}]}`, AccessKey, SecretKey)
	if err := os.WriteFile(conf, []byte(ident), 0o600); err != nil {
		return err
	}
	p := s.ports
	args := []string{"server", "-dir=" + filepath.Join(s.dir, "data"), "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-master.port=" + strconv.Itoa(p[0]), "-master.port.grpc=" + strconv.Itoa(p[1]),
		"-volume.port=" + strconv.Itoa(p[2]), "-volume.port.grpc=" + strconv.Itoa(p[3]),
		"-filer.port=" + strconv.Itoa(p[4]), "-filer.port.grpc=" + strconv.Itoa(p[5]),
		"-s3", "-s3.port=" + strconv.Itoa(p[6]), "-s3.port.grpc=" + strconv.Itoa(p[7]),
		"-s3.config=" + conf, "-s3.autoCreateBucket=false", "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=32",
	}
	s.log, err = os.OpenFile(filepath.Join(s.dir, "weed.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	s.cmd = exec.Command(bin, args...)
	s.cmd.Dir = s.dir
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		s.log.Close()
		return fmt.Errorf("start SeaweedFS: %w", err)
	}
	s.exited = make(chan struct{})
	go func() { s.cmd.Wait(); close(s.exited) }()
	if err := s.waitReady(90 * time.Second); err != nil {
		s.Stop()
		return fmt.Errorf("SeaweedFS did not come up (log: %s): %w", s.log.Name(), err)
	}
	return nil
}

// waitReady waits until a bucket can be created and written: the
// gateway answers once its filer and a volume server are up.
func (s *Server) waitReady(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	cli := s.Client(AccessKey, SecretKey)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-s.exited:
			return errors.New("it exited")
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := cli.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("kvmckpt-ready")})
		if err == nil || isOwned(err) {
			_, err = cli.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("kvmckpt-ready"), Key: aws.String("probe"), Body: http.NoBody})
		}
		cancel()
		if err == nil {
			return nil
		}
		last = err
		time.Sleep(300 * time.Millisecond)
	}
	return last
}

func isOwned(err error) bool {
	var owned interface{ ErrorCode() string }
	return errors.As(err, &owned) && (owned.ErrorCode() == "BucketAlreadyOwnedByYou" || owned.ErrorCode() == "BucketAlreadyExists")
}

// Stop kills the server at once, as a crash would: uploads in flight
// break off.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGCONT)
	<-s.exited
	s.cmd = nil
	s.log.Close()
}

// Freeze stops the server's processes without closing anything: a store
// that hangs. Thaw lets them go on.
func (s *Server) Freeze() { syscall.Kill(-s.cmd.Process.Pid, syscall.SIGSTOP) }

// Thaw undoes Freeze.
func (s *Server) Thaw() { syscall.Kill(-s.cmd.Process.Pid, syscall.SIGCONT) }

// Client is an S3 client of the server with the given credentials.
func (s *Server) Client(access, secret string) *s3.Client {
	return s3.New(s3.Options{
		Region:       Region,
		BaseEndpoint: aws.String(s.Endpoint),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(access, secret, ""),
		// Like objstore's client: no SDK checksum trailers.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// Bucket creates a bucket.
func (s *Server) Bucket(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := s.Client(AccessKey, SecretKey).CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)})
	if err != nil && !isOwned(err) {
		return err
	}
	return nil
}

// Env is the environment that points kvmckpt (and any AWS tool) at the
// server with its credentials, and away from the user's own files.
func (s *Server) Env() map[string]string {
	none := filepath.Join(s.dir, "no-such-file")
	return map[string]string{
		"AWS_ACCESS_KEY_ID": AccessKey, "AWS_SECRET_ACCESS_KEY": SecretKey, "AWS_REGION": Region,
		"AWS_ENDPOINT_URL_S3": s.Endpoint, "AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none,
		"AWS_EC2_METADATA_DISABLED": "true",
	}
}

// Setenv sets Env for the test.
func (s *Server) Setenv(t testing.TB) {
	for k, v := range s.Env() {
		t.Setenv(k, v)
	}
}

// StartT starts a server for the test in a temporary directory, sets its
// environment, creates bucket, and stops it at the end.
func StartT(t testing.TB, bucket string) *Server {
	t.Helper()
	s, err := Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	s.Setenv(t)
	if err := s.Bucket(bucket); err != nil {
		t.Fatal(err)
	}
	return s
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		// Below 55535: SeaweedFS may add 10000 to a port for gRPC.
		for {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return nil, err
			}
			if l.Addr().(*net.TCPAddr).Port < 55535 {
				ls = append(ls, l)
				ports = append(ports, l.Addr().(*net.TCPAddr).Port)
				break
			}
			l.Close()
		}
	}
	return ports, nil
}
