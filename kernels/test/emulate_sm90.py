# Emulation of the sm_90a wgmma kernel's shared layouts (kernels/gemm_sm90.cuh), without a GPU.
#
# The loaders write the tiles exactly as the kernel does; the wgmma operands are then read
# back through the canonical-layout definitions that the descriptors encode (cute's
# make_gmma_desc: SW128 = Swizzle<3,4,3> on byte addresses; K-major ((8,m),(8,2)) with
# SBO = 1024; MN-major ((T,8,n),(8,k)) with LBO = 8192, SBO = 1024), multiplied, and scattered
# through the m64nNk16 accumulator layout into the kernel's epilogue.
#
# Run: python3 kernels/test/emulate_sm90.py   (needs numpy; from any directory)
import numpy as np
BM=128; BN=256; BK=64; STAGES=4; THREADS=256
A_BYTES=BM*BK*2; B_BYTES=BN*BK*2; STAGE_BYTES=A_BYTES+B_BYTES
def sw(a): return a ^ (((a>>7)&7)<<4)
def desc_elem_K(start, sbo, mn, k):   # K-major SW128
    return sw(start + (mn%8)*128 + (mn//8)*sbo + (k%8)*2 + (k//8)*16)
def desc_elem_MN(start, lbo, sbo, mn, k):  # MN-major SW128
    return sw(start + (mn%64)*2 + (mn//64)*lbo + (k%8)*128 + (k//8)*sbo)

def run(M,N,K1,K2,NN,lda1,ldb1,lda2,ldb2,vec1,vec2,bias,beta,D0,ldd,A1,B1,A2,B2):
    D=D0.copy()
    tiles_m=(M+BM-1)//BM; tiles_n=(N+BN-1)//BN
    for tm in range(tiles_m):
      for tn in range(tiles_n):
        m0=tm*BM; n0=tn*BN
        KT1=(K1+BK-1)//BK; KT2=(K2+BK-1)//BK; KT=KT1+KT2
        smem=np.full(STAGES*STAGE_BYTES//2, np.nan)
        def chunk(dst, arr, off, nv):
            nv=max(0,min(8,nv)); assert dst%16==0
            for i in range(8): smem[dst//2+i]=arr[off+i] if i<nv else 0.0
        def load_tile(t,slot):
            second=t>=KT1
            A=A2 if second else A1; B=B2 if second else B1
            lda=lda2 if second else lda1; ldb=ldb2 if second else ldb1
            K=K2 if second else K1; kb=(t-KT1 if second else t)*BK
            sa=slot*STAGE_BYTES; sb=sa+A_BYTES
            for tid in range(THREADS):
                for p in range(4):
                    idx=tid+p*THREADS; r=idx>>3; c=idx&7
                    gm=m0+r; kk=kb+c*8; nv=K-kk if gm<M else 0
                    chunk(sa+r*128+((c^(r&7))<<4),A,(gm if gm<M else 0)*lda+(kk if kk<K else 0),nv)
                if not NN:
                    for p in range(8):
                        idx=tid+p*THREADS; r=idx>>3; c=idx&7
                        gn=n0+r; kk=kb+c*8; nv=K-kk if gn<N else 0
                        chunk(sb+r*128+((c^(r&7))<<4),B,(gn if gn<N else 0)*ldb+(kk if kk<K else 0),nv)
                else:
                    for p in range(8):
                        idx=tid+p*THREADS; r=idx>>5; cn=idx&31; h=cn>>3; c=cn&7
                        kk=kb+r; gn=n0+cn*8; nv=N-gn if kk<K else 0
                        chunk(sb+h*8192+r*128+((c^(r&7))<<4),B,(kk if kk<K else 0)*ldb+(gn if gn<N else 0),nv)
        KF=K1//BK if vec1 else 0
        def load_tile_fast(t,slot):
            sa=slot*STAGE_BYTES; sb=sa+A_BYTES; ka=t*BK
            for tid in range(THREADS):
                r=tid>>3; c=tid&7
                fa_dst=r*128+((c^(r&7))<<4)
                for p in range(4):
                    gm=m0+r+p*32
                    fa=(gm if gm<M else 0)*lda1+c*8
                    chunk(sa+fa_dst+p*4096, A1, fa+ka, 8 if gm<M else 0)
                if not NN:
                    for p in range(8):
                        gn=n0+r+p*32
                        fb=(gn if gn<N else 0)*ldb1+c*8
                        chunk(sb+fa_dst+p*4096, B1, fb+ka, 8 if gn<N else 0)
                else:
                    kr=tid>>5; cn=tid&31
                    fb_dst=(cn>>3)*8192+kr*128+(((cn&7)^(kr&7))<<4)
                    gn=n0+cn*8; nb=max(0,min(8,N-gn))
                    for p in range(8):
                        fb=(kr+p*8)*ldb1+(gn if gn<N else 0)
                        chunk(sb+fb_dst+p*1024, B1, fb+ka*ldb1, nb)
        def load(t,slot):
            if t<KF: load_tile_fast(t,slot)
            elif t<KT: load_tile(t,slot)
        acc=np.zeros((2,128,BN//2))
        for s in range(STAGES-2):
            load(s,s)
        for t in range(KT):
            tl=t+STAGES-2
            # slots in use by wgmma: t%S (now) and (t-1)%S (possibly in flight)
            if tl<KT:
                assert tl%STAGES not in (t%STAGES,(t-1)%STAGES)
                load(tl, tl%STAGES)
            sa=(t%STAGES)*STAGE_BYTES; sb=sa+A_BYTES
            for wg in range(2):
                for ks in range(BK//16):
                    As=sa+wg*(64*128)+ks*32
                    Am=np.array([[smem[desc_elem_K(As,1024,mn,k)//2] for k in range(16)] for mn in range(64)])
                    if NN:
                        Bs=sb+ks*2048
                        Bm=np.array([[smem[desc_elem_MN(Bs,8192,1024,n,k)//2] for n in range(BN)] for k in range(16)])
                    else:
                        Bs=sb+ks*32
                        Bm=np.array([[smem[desc_elem_K(Bs,1024,n,k)//2] for n in range(BN)] for k in range(16)])
                    Cm=Am@Bm
                    assert not np.isnan(Cm).any()
                    for tid in range(128):
                        wrow=tid>>5; lane=tid&31
                        for j in range(BN//8):
                            for h in range(2):
                                for e in range(2):
                                    acc[wg,tid,4*j+2*h+e]+=Cm[16*wrow+(lane>>2)+8*h][8*j+2*(lane&3)+e]
        for tid in range(THREADS):
            wg=tid>>7; wrow=(tid&127)>>5; lane=tid&31
            for j in range(BN//8):
                col=n0+j*8+(lane&3)*2
                if col>=N: continue
                has1=col+1<N
                b0=bias[col] if bias is not None else 0.0
                b1=bias[col+1] if (bias is not None and has1) else 0.0
                for h in range(2):
                    row=m0+wg*64+wrow*16+(lane>>2)+h*8
                    if row>=M: continue
                    v0=acc[wg,tid&127,4*j+2*h]+b0; v1=acc[wg,tid&127,4*j+2*h+1]+b1
                    if beta!=0:
                        v0+=beta*D[row*ldd+col]
                        if has1: v1+=beta*D[row*ldd+col+1]
                    D[row*ldd+col]=v0
                    if has1: D[row*ldd+col+1]=v1
    return D

import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulate_sm80 as emu80
emu80.run=run
ok=True
for args in [(130,136,70,9,False,0,0),(130,136,70,9,True,0,0),(37,40,33,1,False,0,1),(37,40,33,1,True,1,1),
             (1,8,1,0,False,0,0),(129,130,128,64,True,0,3),(140,129,96,5,False,3,0),
             (136,140,200,16,False,0,0),(136,140,200,16,True,0,0),(130,520,130,8,True,0,0),
             (130,300,128,3,False,0,0)]:
    ok&=emu80.check(*args)
print("ALL OK" if ok else "FAIL")
