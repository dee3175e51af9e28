//! Stores for the sync's tests: a wrapper that counts requests (and can break a
//! listing), and moto's S3 server in a process of its own.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts the requests that reach a store, by kind.
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn ObjectStore>,
    lists: AtomicUsize,
    gets: AtomicUsize,
    puts: AtomicUsize,
    /// When set, every listing fails after its first object.
    pub fail_lists: std::sync::atomic::AtomicBool,
}

impl Counting {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            lists: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            puts: AtomicUsize::new(0),
            fail_lists: Default::default(),
        })
    }
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.lists.load(Ordering::SeqCst),
            self.gets.load(Ordering::SeqCst),
            self.puts.load(Ordering::SeqCst),
        )
    }
}

impl std::fmt::Display for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Key,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Key>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Key>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&Key>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        if self.fail_lists.load(Ordering::SeqCst) {
            let failure = object_store::Error::Generic {
                store: "test",
                source: "the connection broke".into(),
            };
            return self
                .inner
                .list(prefix)
                .take(1)
                .chain(futures::stream::once(async move { Err(failure) }))
                .boxed();
        }
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&Key>,
    ) -> object_store::Result<object_store::ListResult> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Key,
        to: &Key,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// moto's S3 server in a Python process of its own (the venv's, which `make setup`
/// makes), with buckets `bucket-0`, `bucket-1`, ...; killed on drop. Absent Python or moto, the moto
/// test is skipped with a line, unless `NNSERVE_REQUIRE_MOTO` is set (as `make test`
/// sets it), where it fails.
pub struct Moto {
    child: std::process::Child,
    endpoint: String,
}

const MOTO: &str = r#"
import sys
import boto3
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
host, port = s.get_host_and_port()
url = f"http://{host}:{port}"
c = boto3.client("s3", endpoint_url=url, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1")
for i in range(int(sys.argv[1])):
    c.create_bucket(Bucket=f"bucket-{i}")
print(url, flush=True)
sys.stdin.read()
"#;

impl Moto {
    pub fn start(buckets: usize) -> Option<Moto> {
        use std::io::BufRead;
        let python = std::env::var_os("NNSERVE_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        let required = std::env::var_os("NNSERVE_REQUIRE_MOTO").is_some();
        let child = std::process::Command::new(&python)
            .args(["-c", MOTO, &buckets.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if !required => {
                eprintln!(
                    "skipped: no {} ({e}); `make setup` makes it",
                    python.display()
                );
                return None;
            }
            Err(e) => panic!("cannot run {}: {e}", python.display()),
        };
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        if !line.starts_with("http://") {
            let _ = child.kill();
            assert!(
                !required,
                "moto did not start with {}: is moto[server] installed?",
                python.display()
            );
            eprintln!("skipped: moto does not start with {}", python.display());
            return None;
        }
        Some(Moto {
            child,
            endpoint: line.trim().to_string(),
        })
    }

    pub fn bucket(&self, i: usize) -> Arc<dyn ObjectStore> {
        install_tls_provider();
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name(format!("bucket-{i}"))
                .with_region("us-east-1")
                .with_access_key_id("t")
                .with_secret_access_key("t")
                .build()
                .unwrap(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
