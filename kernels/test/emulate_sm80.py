# Emulation of the sm_80 tensor-core kernel (kernels/gemm_sm80.cuh, the 128 x 128 tile), without a GPU.
#
# A literal Python translation of the kernel's index math (block rasterisation, the general
# and the hoisted fast tile loaders with cp.async zero-fill, the swizzled shared layouts, the
# per-lane ldmatrix addresses, the epilogue) executed against the PTX semantics of
# ldmatrix.x4 / ldmatrix.x4.trans and the mma.m16n8k16 A/B/C fragment layouts. Integer data,
# so the result must equal the float64 reference exactly; row padding of D must be untouched;
# a never-written shared element (NaN) reaching an mma fails the run.
#
# Run: python3 kernels/test/emulate_sm80.py   (needs numpy; a few seconds)
# Keep it in step with the kernel when the kernel's index math changes.
import numpy as np, sys
BM=BN=128; BK=32; STAGES=4; THREADS=256; WM=64; WN=32; MI=4; NJ=4
A_BYTES=BM*BK*2; B_BYTES=BN*BK*2; STAGE_BYTES=A_BYTES+B_BYTES

def block_tile_coords(pid, tiles_m, tiles_n):
    G=8; in_group=G*tiles_n; group=pid//in_group; first_m=group*G
    gsize=min(tiles_m-first_m,G); r=pid-group*in_group
    return first_m + r%gsize, r//gsize

def run(M,N,K1,K2,NN,lda1,ldb1,lda2,ldb2,vec1,vec2,bias,beta,D0,ldd,A1,B1,A2,B2):
    # matrices given as flat numpy arrays with lds
    D=D0.copy()
    tiles_m=(M+BM-1)//BM; tiles_n=(N+BN-1)//BN
    seen=set()
    for pid in range(tiles_m*tiles_n):
        tm,tn=block_tile_coords(pid,tiles_m,tiles_n); seen.add((tm,tn))
        m0=tm*BM; n0=tn*BN
        KT1=(K1+BK-1)//BK; KT2=(K2+BK-1)//BK; KT=KT1+KT2
        smem=np.full(STAGES*STAGE_BYTES//2, np.nan)  # element-addressed; NaN = never written
        def chunk(dst, src_arr, src_off, nv, vec):
            nv=max(0,min(8,nv))
            assert dst%16==0
            e=dst//2
            for i in range(8):
                smem[e+i]= src_arr[src_off+i] if i<nv else 0.0
        def load_tile(t,slot):
            second=t>=KT1
            A=A2 if second else A1; B=B2 if second else B1
            lda=lda2 if second else lda1; ldb=ldb2 if second else ldb1
            K=K2 if second else K1; kb=(t-KT1 if second else t)*BK
            vec=vec2 if second else vec1
            sa=slot*STAGE_BYTES; sb=sa+A_BYTES
            for tid in range(THREADS):
                for p in range(2):
                    idx=tid+p*THREADS; r=idx>>2; c=idx&3
                    gm=m0+r; kk=kb+c*8
                    nv=K-kk if gm<M else 0
                    off=(gm if gm<M else 0)*lda+(kk if kk<K else 0)
                    chunk(sa+r*64+((c^((r>>1)&3))<<4),A,off,nv,vec)
                if not NN:
                    for p in range(2):
                        idx=tid+p*THREADS; r=idx>>2; c=idx&3
                        gn=n0+r; kk=kb+c*8
                        nv=K-kk if gn<N else 0
                        off=(gn if gn<N else 0)*ldb+(kk if kk<K else 0)
                        chunk(sb+r*64+((c^((r>>1)&3))<<4),B,off,nv,vec)
                else:
                    for p in range(2):
                        idx=tid+p*THREADS; r=idx>>4; c=idx&15
                        kk=kb+r; gn=n0+c*8
                        nv=N-gn if kk<K else 0
                        off=(kk if kk<K else 0)*ldb+(gn if gn<N else 0)
                        chunk(sb+r*256+((c^(r&7))<<4),B,off,nv,vec)
        KF=K1//BK if vec1 else 0
        def load_tile_fast(t,slot):
            sa=slot*STAGE_BYTES; sb=sa+A_BYTES; ka=t*BK
            for tid in range(THREADS):
                r=tid>>2; c=tid&3
                fa_dst=r*64+((c^((r>>1)&3))<<4)
                for p in range(2):
                    gm=m0+r+p*64
                    fa=(gm if gm<M else 0)*lda1+c*8
                    fan=16 if gm<M else 0
                    chunk(sa+fa_dst+p*4096, A1, fa+ka, fan//2, True)
                if not NN:
                    fb_dst=fa_dst
                    for p in range(2):
                        gn=n0+r+p*64
                        fb=(gn if gn<N else 0)*ldb1+c*8
                        fbn=16 if gn<N else 0
                        chunk(sb+fb_dst+p*4096, B1, fb+ka, fbn//2, True)
                else:
                    kr=tid>>4; cn=tid&15
                    fb_dst=kr*256+((cn^(kr&7))<<4)
                    gn=n0+cn*8
                    nb=max(0,min(8,N-gn))*2
                    for p in range(2):
                        fb=(kr+p*16)*ldb1+(gn if gn<N else 0)
                        chunk(sb+fb_dst+p*4096, B1, fb+ka*ldb1, nb//2, True)
        def load(t,slot):
            if t<KF: load_tile_fast(t,slot)
            elif t<KT: load_tile(t,slot)
        acc=np.zeros((8,32,MI,NJ,4))
        # the pipeline's slot bookkeeping: emulate sequentially (ordering is by construction)
        for s in range(STAGES-1): load(s,s)
        for t in range(KT):
            slot=t%STAGES
            # (loads of tile t+STAGES-1 go to slot (t-1)%STAGES, never the one computed now)
            tl=t+STAGES-1
            if tl<KT: assert tl%STAGES!=slot
            for warp in range(8):
                wm=warp>>2; wn=warp&3
                # per-lane offsets
                a_off=np.zeros((32,2),int); b_off=np.zeros((32,2),int)
                for lane in range(32):
                    r=wm*WM+(lane&15)
                    for ks in range(2):
                        c=ks*2+(lane>>4); a_off[lane,ks]=r*64+((c^((r>>1)&3))<<4)
                    if not NN:
                        r=wn*WN+(lane&7)+((lane>>4)<<3)
                        for ks in range(2):
                            c=ks*2+((lane>>3)&1); b_off[lane,ks]=r*64+((c^((r>>1)&3))<<4)
                    else:
                        kr=(lane&7)+(((lane>>3)&1)<<3)
                        for jp in range(2):
                            c=wn*(WN//8)+jp*2+(lane>>4); b_off[lane,jp]=kr*256+((c^(kr&7))<<4)
                sa=slot*STAGE_BYTES; sb=sa+A_BYTES
                def ldsm(addrs, trans):
                    # addrs[lane]: byte address supplied by lane; returns regs[lane][j] = (lo,hi)
                    mats=[]
                    for j in range(4):
                        m=np.zeros((8,8))
                        for rr in range(8):
                            a=addrs[8*j+rr]; assert a%16==0
                            m[rr]=smem[a//2:a//2+8]
                        mats.append(m)
                    regs=np.zeros((32,4,2))
                    for t_ in range(32):
                        for j in range(4):
                            if not trans: regs[t_,j]=mats[j][t_//4, 2*(t_%4):2*(t_%4)+2]
                            else: regs[t_,j]=[mats[j][2*(t_%4), t_//4], mats[j][2*(t_%4)+1, t_//4]]
                    return regs
                for ks in range(2):
                    af=[ldsm([sa+a_off[l,ks]+i*16*64 for l in range(32)],False) for i in range(MI)]
                    bf=[None]*NJ
                    for jp in range(2):
                        if not NN: r_=ldsm([sb+b_off[l,ks]+jp*16*64 for l in range(32)],False)
                        else: r_=ldsm([sb+ks*16*256+b_off[l,jp] for l in range(32)],True)
                        bf[2*jp]=r_[:,0:2]; bf[2*jp+1]=r_[:,2:4]
                    for i in range(MI):
                        # A matrix from fragments
                        Am=np.zeros((16,16))
                        for l in range(32):
                            g=l>>2; tq=l&3
                            for e in range(2):
                                Am[g][2*tq+e]=af[i][l,0,e]; Am[g+8][2*tq+e]=af[i][l,1,e]
                                Am[g][8+2*tq+e]=af[i][l,2,e]; Am[g+8][8+2*tq+e]=af[i][l,3,e]
                        for j in range(NJ):
                            Bm=np.zeros((16,8))
                            for l in range(32):
                                g=l>>2; tq=l&3
                                for e in range(2):
                                    Bm[2*tq+e][g]=bf[j][l,0,e]; Bm[8+2*tq+e][g]=bf[j][l,1,e]
                            Cm=Am@Bm
                            assert not np.isnan(Cm).any(), "read unwritten smem"
                            for l in range(32):
                                g=l>>2; tq=l&3
                                for e in range(2):
                                    acc[warp,l,i,j,e]+=Cm[g][2*tq+e]; acc[warp,l,i,j,2+e]+=Cm[g+8][2*tq+e]
            if tl<KT: load(tl, tl%STAGES)
        # epilogue
        for warp in range(8):
            wm=warp>>2; wn=warp&3
            for lane in range(32):
                for j in range(NJ):
                    col=n0+wn*WN+j*8+(lane&3)*2
                    if col>=N: continue
                    has1=col+1<N
                    b0=b1=0.0
                    if bias is not None:
                        b0=bias[col]; b1=bias[col+1] if has1 else 0.0
                    for i in range(MI):
                        for h in range(2):
                            row=m0+wm*WM+i*16+(lane>>2)+h*8
                            if row>=M: continue
                            v0=acc[warp,lane,i,j,2*h]+b0; v1=acc[warp,lane,i,j,2*h+1]+b1
                            if beta!=0:
                                v0=beta*D[row*ldd+col]+v0
                                if has1: v1=beta*D[row*ldd+col+1]+v1
                            D[row*ldd+col]=v0
                            if has1: D[row*ldd+col+1]=v1
    assert len(seen)==tiles_m*tiles_n
    return D

def mat(r,c,ld,rng):
    a=np.full(max(0,(r-1)*ld+c)+16, 1e6)  # padding sentinel
    for i in range(r): a[i*ld:i*ld+c]=rng.integers(-4,5,c)
    return a

def check(M,N,K1,K2,NN,pad1,pad2,seed=0,bias_on=True,beta=0.5):
    rng=np.random.default_rng(seed)
    r8=lambda x:(x+7)//8*8
    lda1=r8(K1)+pad1; lda2=r8(K2)+pad2 if K2 else 0
    if not NN: ldb1=r8(K1)+pad1; ldb2=r8(K2)+pad2 if K2 else 0
    else: ldb1=r8(N)+pad1; ldb2=r8(N)+pad2
    A1=mat(M,K1,lda1,rng); A2=mat(M,K2,lda2,rng) if K2 else np.zeros(16)
    B1=mat(N,K1,ldb1,rng) if not NN else mat(K1,N,ldb1,rng)
    B2=(mat(N,K2,ldb2,rng) if not NN else mat(K2,N,ldb2,rng)) if K2 else np.zeros(16)
    ldd=r8(N); D0=mat(M,N,ldd,rng)
    bias=rng.integers(-4,5,N).astype(float) if bias_on else None
    vec1=(lda1%8==0 and ldb1%8==0); vec2=(K2==0) or (lda2%8==0 and ldb2%8==0)
    D=run(M,N,K1,K2,NN,lda1,ldb1,lda2,ldb2,vec1,vec2,bias,beta,D0,ldd,A1,B1,A2,B2)
    g=lambda a,ld,i,j: a[i*ld+j]
    ref=np.zeros((M,N))
    for i in range(M):
        for j in range(N):
            s=0.0
            for k in range(K1): s+=g(A1,lda1,i,k)*(g(B1,ldb1,k,j) if NN else g(B1,ldb1,j,k))
            for k in range(K2): s+=g(A2,lda2,i,k)*(g(B2,ldb2,k,j) if NN else g(B2,ldb2,j,k))
            if bias is not None: s+=bias[j]
            s+=beta*g(D0,ldd,i,j)
            ref[i,j]=s
    got=np.array([[D[i*ldd+j] for j in range(N)] for i in range(M)])
    err=np.abs(got-ref).max()
    # padding of D untouched
    padok=all(D[i*ldd+j]==D0[i*ldd+j] for i in range(M-1) for j in range(N,ldd))
    print(f"NN={NN} M={M} N={N} K1={K1} K2={K2} pads=({pad1},{pad2}) vec=({vec1},{vec2}) maxerr={err} padok={padok}", flush=True)
    return err==0 and padok

if __name__=="__main__":
  ok=True
  for args in [(130,136,70,9,False,0,0),(130,136,70,9,True,0,0),(37,40,33,1,False,0,1),(37,40,33,1,True,1,1),
               (1,8,1,0,False,0,0),(1,8,16,8,True,0,0),(129,130,64,64,True,0,3),(140,129,96,5,False,3,0)]:
      ok&=check(*args)
  print("ALL OK" if ok else "FAIL")
