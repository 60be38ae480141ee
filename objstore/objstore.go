// Package objstore keeps checkpoints in S3-compatible object storage: a
// multipart upload that a save streams into, parts sent in parallel as
// they fill, and an object read with parallel ranged GETs. It knows
// buckets and keys only; the checkpoint format is the writer's.
//
// Endpoint, region and credentials are found the way AWS's own tools find
// them: the AWS_* environment variables (AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_S3,
// AWS_ENDPOINT_URL), then the shared config and credentials files.
// [Config].Endpoint (kvmckpt's --s3-endpoint) names a store that is not
// AWS; with an endpoint, keys are addressed path-style
// (http://host/bucket/key), which every S3-compatible store serves.
package objstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/kvmckpt/kvmckpt/writer"
)

// Scheme is the scheme of the names this package serves: s3://BUCKET/KEY.
const Scheme = "s3"

// Config says how to reach the store; the zero Config takes everything
// from the environment and the shared files.
type Config struct {
	// Endpoint is the store's URL (http://127.0.0.1:8333); empty means
	// AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS itself.
	Endpoint string
	// Parallel is how many parts are sent, or ranges read, at once; 0
	// means 8.
	Parallel int
	// PartSize is the size of an upload's parts, and of the ranges read;
	// 0 means 16 MiB (more for an object that would need over 9,000
	// parts).
	PartSize int64
	// Timeout bounds each request (a part, a range); 0 means a minute.
	Timeout time.Duration
}

// Location is a bucket and a key.
type Location struct {
	Bucket, Key string
}

func (l Location) String() string { return Scheme + "://" + l.Bucket + "/" + l.Key }

// Parse parses s3://BUCKET/KEY.
func Parse(name string) (Location, error) {
	rest, ok := strings.CutPrefix(name, Scheme+"://")
	if !ok {
		return Location{}, fmt.Errorf("%q is not an s3://BUCKET/KEY name", name)
	}
	bucket, key, _ := strings.Cut(rest, "/")
	switch {
	case bucket == "":
		return Location{}, fmt.Errorf("%q names no bucket: write s3://BUCKET/KEY", name)
	case key == "" || strings.HasSuffix(key, "/"):
		return Location{}, fmt.Errorf("%q names no object: write s3://BUCKET/KEY, KEY not ending in /", name)
	case len(key) > 1024:
		return Location{}, fmt.Errorf("%q: a key is at most 1024 bytes", name)
	}
	return Location{Bucket: bucket, Key: key}, nil
}

// Store is a connection to one S3-compatible store. It is safe for
// concurrent use.
type Store struct {
	cfg  Config
	once sync.Once
	cli  *s3.Client
	err  error
}

// New returns a Store for cfg; nothing is contacted until it is used.
func New(cfg Config) *Store {
	if cfg.Parallel <= 0 {
		cfg.Parallel = 8
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Minute
	}
	return &Store{cfg: cfg}
}

func (s *Store) client() (*s3.Client, error) {
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
		defer cancel()
		ac, err := config.LoadDefaultConfig(ctx)
		if err != nil {
			s.err = fmt.Errorf("s3 configuration: %w", err)
			return
		}
		if ac.Region == "" {
			ac.Region = "us-east-1" // what S3-compatible stores expect when none is set
		}
		endpoint := s.cfg.Endpoint
		if endpoint == "" {
			endpoint = orElse(os.Getenv("AWS_ENDPOINT_URL_S3"), os.Getenv("AWS_ENDPOINT_URL"))
		}
		// Enough connections for the parts in flight.
		hc := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
			t.MaxIdleConnsPerHost = 2 * s.cfg.Parallel
		})
		s.cli = s3.NewFromConfig(ac, func(o *s3.Options) {
			o.HTTPClient = hc
			if endpoint != "" {
				o.BaseEndpoint = aws.String(endpoint)
				o.UsePathStyle = true
			}
			// Every part carries the CRC-32C this package computes; the
			// SDK is not to add a checksum of its own (a trailer some
			// stores do not take).
			o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
			o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		})
	})
	return s.cli, s.err
}

// locate parses name and returns the client to reach it.
func (s *Store) locate(name string) (Location, *s3.Client, error) {
	loc, err := Parse(name)
	if err != nil {
		return loc, nil, err
	}
	cli, err := s.client()
	return loc, cli, err
}

// orElse is a, or b if a is empty.
func orElse(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// Check reports whether the bucket of name exists and the credentials
// reach it, without writing anything.
func (s *Store) Check(ctx context.Context, name string) error {
	loc, cli, err := s.locate(name)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	_, err = cli.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(loc.Bucket)})
	// HEAD has no body: a missing bucket is only its 404.
	if _, missing := errors.AsType[*types.NotFound](err); missing {
		return fmt.Errorf("reach the bucket of %s: bucket %q does not exist: create it, or name another", loc, loc.Bucket)
	}
	return explain(err, loc, "reach the bucket of")
}

// explain turns an S3 error into one that says what went wrong at loc and
// what to do. A missing object wraps fs.ErrNotExist.
func explain(err error, loc Location, doing string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s %s: %w", doing, loc, err)
	}
	code, status := "", 0
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code = ae.ErrorCode()
	}
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		status = re.HTTPStatusCode()
	}
	switch {
	case code == "NoSuchBucket":
		return fmt.Errorf("%s %s: bucket %q does not exist: create it, or name another", doing, loc, loc.Bucket)
	case code == "NoSuchKey" || status == http.StatusNotFound:
		return fmt.Errorf("%s %s: no such object: %w", doing, loc, fs.ErrNotExist)
	case code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" || code == "AccessDenied" ||
		status == http.StatusForbidden || status == http.StatusUnauthorized:
		return fmt.Errorf("%s %s: the store refused the credentials (%s): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the profile's credentials file: %w: %w", doing, loc, orElse(code, http.StatusText(status)), writer.ErrStoreAccess, err)
	case code == "PreconditionFailed" || status == http.StatusPreconditionFailed:
		return fmt.Errorf("%s %s: the object was overwritten since it was opened: %w", doing, loc, ErrChanged)
	}
	var oe *smithy.OperationError
	if errors.As(err, &oe) && status == 0 {
		return fmt.Errorf("%s %s: the store cannot be reached (is the endpoint right, the server up? --s3-endpoint or AWS_ENDPOINT_URL_S3): %w: %w", doing, loc, writer.ErrStoreAccess, err)
	}
	return fmt.Errorf("%s %s: %w", doing, loc, err)
}

// ErrChanged is wrapped by a read of an object that was replaced or cut
// short after it was opened.
var ErrChanged = errors.New("object changed while being read")
